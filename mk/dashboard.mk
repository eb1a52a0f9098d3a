# mk/dashboard.mk: embeds metrics/dashboard.html into the library
# (metrics/dashboard.c includes it with the assembler's .incbin) and
# installs chromium for the headless browser tests (dashboard, CORS).

$(BUILD)/metrics/dashboard.o: metrics/dashboard.html
$(BUILD)/metrics/dashboard.o: CFLAGS += -DMETRICS_DASHBOARD_HTML='"$(CURDIR)/metrics/dashboard.html"'

# tests/metrics/test_dashboard.c renders the page in headless Chromium.
DATA_TARGETS += chromium
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing: chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
