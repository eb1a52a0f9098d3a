# The official openai npm client, used by tests/router/test_openai_sdk.c to
# prove that an unmodified client works with only its base URL changed.
# openai 6.x runs on Node 20 (7.x needs Node 22).
OPENAI_NPM_VERSION := 6.30.1
OPENAI_NPM := build/npm-openai/node_modules/openai/package.json
DATA_TARGETS += $(OPENAI_NPM)

$(OPENAI_NPM):
	@mkdir -p build/npm-openai
	cd build/npm-openai && npm install --no-save --no-audit --no-fund --loglevel=error \
	  openai@$(OPENAI_NPM_VERSION)
