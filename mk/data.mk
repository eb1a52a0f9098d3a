# Data the build fetches rather than the repo carrying: token rank tables
# (issue 3). Empty until the tokenizer lands.
.PHONY: data
data:
	@true
