"""Exit statuses of every binary (train/, export/): one meaning per number.

=====  ================  ==========================================================
code   name              meaning
=====  ================  ==========================================================
0      OK                all done: every input was processed and every output written
1      COULD_NOT_START   could not start, or a bad request (flags, paths, a missing
                         extra, an error before any output): nothing written
2      SOME_REFUSED      finished, but some inputs were refused; each is named (on
                         stderr or in the run's report), the others were written
=====  ================  ==========================================================

A training run that stops on a failure (non-finite loss, collapsed model) also exits
COULD_NOT_START: it publishes no model and keeps its last good checkpoint for a resume.
absl's ``app.run`` ends with ``sys.exit(main(argv))``; ``sys.exit("error: ...")`` (a message
instead of a number) also exits with COULD_NOT_START.
"""

OK = 0
COULD_NOT_START = 1
SOME_REFUSED = 2

MEANINGS = {
    OK: "all done",
    COULD_NOT_START: "could not start or bad request; nothing written",
    SOME_REFUSED: "finished, some inputs refused, each named",
}
