# The official @anthropic-ai/sdk npm client, used by
# tests/router/test_anthropic_sdk.c to prove that an unmodified Anthropic
# client works against /v1/messages with only its base URL changed.
ANTHROPIC_NPM_VERSION := 1.17.0
ANTHROPIC_NPM := build/npm-anthropic/node_modules/@anthropic-ai/sdk/package.json
DATA_TARGETS += $(ANTHROPIC_NPM)

$(ANTHROPIC_NPM):
	@mkdir -p build/npm-anthropic
	cd build/npm-anthropic && npm install --no-save --no-audit --no-fund --loglevel=error \
	  @anthropic-ai/sdk@$(ANTHROPIC_NPM_VERSION)
