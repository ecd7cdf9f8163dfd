"""Run one fuzz target under atheris (libFuzzer):

    python -m tests.fuzz.run TARGET [libFuzzer options] [corpus dirs]

`tools/fuzz` is the usual way in. mlink is imported inside
`atheris.instrument_imports` so that coverage of its code guides the
fuzzer; the harness itself is not instrumented (its branches are ours).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mlink"]):
    import mlink.sasl.registry  # noqa: F401  (instrumented before the harness runs)
    import mlink.stream.c2s  # noqa: F401
    import mlink.stream.component  # noqa: F401
    import mlink.xml.parser  # noqa: F401
    from tests.fuzz.harness import TARGETS

USAGE = f"usage: python -m tests.fuzz.run {{{'|'.join(TARGETS)}}} [libFuzzer options]"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(USAGE)
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
