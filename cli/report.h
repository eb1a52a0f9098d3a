/*
 * cli/report.h: `costrouter report`, totals and cost per 1K requests from
 * cost logs (see metrics_cost_record_json for the line format).
 */
#ifndef CLI_REPORT_H
#define CLI_REPORT_H

/*
 * Run the report. argv[0] is the subcommand name ("report"); then
 *   [--format table|csv|json] [--by tenant,tag,backend,route,arm]
 *   [--progress] [-o FILE] [FILE|-]...
 * (no FILE: stdin). `tag` expands to every tag key; `tag.KEY` picks one.
 * Groups requests by each chosen dimension; for A/B arms (per experiment
 * key if present, else per route) prints the difference of mean cost per
 * request between each pair of arms with a 95% Welch confidence interval.
 * Token columns count what was billed (billed_*_tokens; a log older than
 * those keys: the upstream's usage, else the estimate). Amounts are
 * cost_usd and saved_usd, summed exactly to the pico-USD; CSV and JSON
 * print the sums exactly, the table to the micro-USD. Lines that are not
 * JSON objects, or have numbers no router writes, are skipped and
 * counted. A progress line
 * goes to stderr when it is a terminal or with --progress.
 * Returns 0, 1 (a file could not be read or written) or 2 (usage).
 */
int cli_report_main(int argc, char **argv);

#endif
