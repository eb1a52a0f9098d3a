/* main.c: command line entry point; placeholder until the router lands. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        puts("costrouter 0.1.0");
        return 0;
    }
    fprintf(stderr, "usage: costrouter -c FILE\n");
    return 2;
}
