import sys

# `profilerd serve --for-runs` (started by `profilerd run` beside its training): even the
# daemon's own modules, the CLI's included, are imported at low priority before they are used.
if sys.argv[1:3] == ["serve", "--for-runs"]:
    from profilerd.runtime import import_yielding_the_cpu

    import_yielding_the_cpu("profilerd.cli", "profilerd.daemon")

from profilerd.cli import main

sys.exit(main())
