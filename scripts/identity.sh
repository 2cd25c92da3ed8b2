#!/usr/bin/env bash
# Identity of a pipeline input, for the Makefile's output keys (12 hex digits): for a file or
# folder, its resolved path and the relative path, size and modification time of every file in
# it (so editing, replacing or moving the input changes its identity, and two folders that
# share a name do not share one); for anything else (a hub id such as
# roneneldan/TinyStories-33M), the name itself. Reads only metadata: fast on multi-GB inputs.
set -euo pipefail
p="${1:-}"
if [ -n "$p" ] && [ -e "$p" ]; then
    r=$(realpath "$p")
    { echo "path $r"; find -L "$r" -type f -not -name '.*' -printf '%P %s %T@\n' | LC_ALL=C sort; } | md5sum | cut -c1-12
else
    printf 'name %s' "$p" | md5sum | cut -c1-12
fi
