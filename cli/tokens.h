/* cli/tokens.h: the `costrouter tokens` subcommand. */
#ifndef CLI_TOKENS_H
#define CLI_TOKENS_H

/*
 * Run `costrouter tokens ARGS`; argv[0] is "tokens". Prints the count to
 * stdout, errors to stderr. Returns the process exit status: 0, 1 on
 * failure, 2 on bad usage.
 */
int cli_tokens_main(int argc, char **argv);

#endif
