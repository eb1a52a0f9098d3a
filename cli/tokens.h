/* cli/tokens.h: the `costrouter tokens` subcommand. */
#ifndef CLI_TOKENS_H
#define CLI_TOKENS_H

#include <stdio.h>

/* Its arguments, as usage lines show them after "costrouter ". */
#define CLI_TOKENS_SYNOPSIS                                                                        \
    "tokens --encoding ENC [--chat|--responses|--messages] [--ids] [--data DIR] [FILE|-]"

/* Print what each of its options does, a line or two each, to `f`: for
 * `costrouter tokens --help` and `costrouter --help`. */
void cli_tokens_options(FILE *f);

/*
 * Run `costrouter tokens ARGS`; argv[0] is "tokens". Prints the count to
 * stdout, errors to stderr; --help (-h) prints the usage to stdout.
 * Returns the process exit status: 0, 1 on failure, 2 on bad usage.
 */
int cli_tokens_main(int argc, char **argv);

#endif
