# mk/dashboard.mk: embeds metrics/dashboard.html into the library
# (metrics/dashboard.c includes it with the assembler's .incbin) and
# installs chromium for the headless dashboard test.

$(BUILD)/metrics/dashboard.o: metrics/dashboard.html
$(BUILD)/metrics/dashboard.o: CFLAGS += -DMETRICS_DASHBOARD_HTML='"$(CURDIR)/metrics/dashboard.html"'
