#!/usr/bin/env bash
# Apply ftsam-plugin's patches to a BackdoorBench checkout (main @ f02e353) and install its files there
# (patches/files/ mirrors the checkout: defense/ftsam.py, config/defense/ftsam/*.yaml).
#   bash patches/apply.sh /path/to/BackdoorBench
# Every patch is checked first (git apply --check) and every file compared; nothing is changed unless all patches
# either apply cleanly or are already applied and no file to install exists with other contents. Re-running is
# safe: applied patches and installed files are reported and left alone.
# Exit 0 on success; 1 (with a one-line reason) if a patch or a file conflicts; 2 on bad usage.
set -u

usage="usage: bash patches/apply.sh /path/to/BackdoorBench"
if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "$usage" >&2
    exit 2
fi
patch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$1
if [ ! -d "$root/defense" ] || [ ! -f "$root/utils/save_load_attack.py" ]; then
    echo "error: $root is not a BackdoorBench checkout (no defense/ or utils/save_load_attack.py);" \
         "pass its root folder" >&2
    exit 2
fi
root=$(cd "$root" && pwd)

# Use git apply outside any repository the checkout may sit in (paths are relative to $root); else patch(1).
if command -v git >/dev/null 2>&1; then
    tool=git
    export GIT_CEILING_DIRECTORIES=$(dirname "$root")
    check()   { (cd "$root" && git apply --check "$@" 2>&1); }
    do_apply() { (cd "$root" && git apply "$1" 2>&1); }
elif command -v patch >/dev/null 2>&1; then
    tool=patch
    check()   { local rev=""; [ "$1" = "--reverse" ] && { rev=-R; shift; }
                (cd "$root" && patch -p1 -f -s --dry-run $rev -i "$1" 2>&1); }
    do_apply() { (cd "$root" && patch -p1 -f -s -i "$1" 2>&1); }
else
    echo "error: neither git nor patch is installed; install git" >&2
    exit 1
fi

shopt -s nullglob
patches=("$patch_dir"/*.patch)
if [ ${#patches[@]} -eq 0 ]; then
    echo "error: no .patch files in $patch_dir" >&2
    exit 1
fi

todo=()
failed=""
for p in "${patches[@]}"; do
    name=$(basename "$p")
    if out=$(check "$p"); then
        echo "$name: applies cleanly"
        todo+=("$p")
    elif check --reverse "$p" >/dev/null; then
        echo "$name: already applied"
    else
        reason=$(printf '%s\n' "$out" | grep -v '^\s*$' | head -n 1)
        echo "$name: does not apply cleanly: $reason"
        [ -z "$failed" ] && failed="$name does not apply cleanly to $root ($reason); the checkout differs from"\
" BackdoorBench main @ f02e353 - restore the patched files or apply by hand"
    fi
done
files_dir="$patch_dir/files"
installs=()
while IFS= read -r -d '' src; do
    rel=${src#"$files_dir"/}
    if [ ! -e "$root/$rel" ]; then
        echo "$rel: installs cleanly"
        installs+=("$rel")
    elif cmp -s "$src" "$root/$rel"; then
        echo "$rel: already installed"
    else
        echo "$rel: exists with other contents"
        [ -z "$failed" ] && failed="$root/$rel exists with other contents (an older version, or your own file);"\
" move it away and rerun"
    fi
done < <([ -d "$files_dir" ] && find "$files_dir" -type f ! -name '*.pyc' -print0 | sort -z)

if [ -n "$failed" ]; then
    echo "error: $failed; nothing was changed" >&2
    exit 1
fi
for p in "${todo[@]}"; do
    name=$(basename "$p")
    if out=$(do_apply "$p"); then
        echo "$name: applied"
    else
        echo "error: $name failed to apply with $tool: $(printf '%s\n' "$out" | head -n 1)" >&2
        exit 1
    fi
done
for rel in "${installs[@]}"; do
    if mkdir -p "$(dirname "$root/$rel")" && cp "$files_dir/$rel" "$root/$rel"; then
        echo "$rel: installed"
    else
        echo "error: could not write $root/$rel; check the folder's permissions" >&2
        exit 1
    fi
done
echo "done: ${#patches[@]} patch(es) and the files of $files_dir in place in $root"
