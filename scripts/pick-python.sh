#!/bin/sh
# Print the Python interpreter `make` builds the venv with.
#
# The distribution's own python3 comes first when it is new enough (3.11, as
# pyproject.toml asks) and can make a venv. Debian's is linked with libpython
# inside the executable; a pyenv build here had it as a shared library
# (--enable-shared), and took 40-60 % longer to run plain Python code. On the
# project's VM, in two alternating pairs of labs, the agents spent 11-23 % less
# CPU per message under Debian's 3.11 than under pyenv's 3.11, and the
# pipeline carried 9-41 % more mail (benchmarks/README.md, "The interpreter").
#
# Otherwise: the first python3 on PATH, as before. `make PYTHON=...` overrides
# both.
for candidate in /usr/bin/python3 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "$candidate"
    exit 0
  fi
done
echo python3
