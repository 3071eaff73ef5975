"""`python -m megalite ...` is the same entry as the `megalite` console script."""
from megalite.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
