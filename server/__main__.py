"""`ggserve` command line: `ggserve [serve flags]`, `ggserve tokenize ...`, `ggserve generate ...`, `ggserve info ...`."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tokenize":
        from ggserve.server.cli.tokenize import main as tokenize_main

        return tokenize_main(argv[1:])
    if argv and argv[0] == "info":
        from ggserve.server.cli.info import main as info_main

        return info_main(argv[1:])
    if argv and argv[0] == "generate":
        from ggserve.server.cli.generate import main as generate_main

        return generate_main(argv[1:])
    from ggserve.server.cli.serve import main as serve_main

    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
