#!/usr/bin/env bash
# build-corpus.sh: the English text corpus of `ferry-bench quality`, made from texts that Debian
# packages install (licenses, manuals, documentation), so it needs no download.
#
#   scripts/build-corpus.sh [OUTDIR]      (default build/quality-corpus)
#
# Writes one UTF-8 .txt per source document into OUTDIR and OUTDIR/SOURCES.md, which lists each
# document's origin path, Debian package and version, and its size. Sources that this machine
# lacks are skipped (and said so); the script fails only when fewer than four documents remain.
# Text is normalised, nothing else: info-file control characters and node headers removed,
# man pages rendered without hyphenation or overstrike, runs of blank lines collapsed.
set -euo pipefail

out=${1:-build/quality-corpus}
mkdir -p "$out"
rm -f "$out"/*.txt "$out/SOURCES.md"

# name|kind|path  (kind: plain, gz, info (gz, all parts), man (page name))
sources=(
  "gpl-3|plain|/usr/share/common-licenses/GPL-3"
  "gpl-2|plain|/usr/share/common-licenses/GPL-2"
  "lgpl-2.1|plain|/usr/share/common-licenses/LGPL-2.1"
  "gfdl-1.3|plain|/usr/share/common-licenses/GFDL-1.3"
  "apache-2.0|plain|/usr/share/common-licenses/Apache-2.0"
  "mpl-2.0|plain|/usr/share/common-licenses/MPL-2.0"
  "libjpeg-structure|gz|/usr/share/doc/libjpeg62-turbo-dev/structure.txt.gz"
  "libjpeg-usage|gz|/usr/share/doc/libjpeg62-turbo-dev/libjpeg.txt.gz"
  "users-and-groups|gz|/usr/share/doc/base-passwd/users-and-groups.txt.gz"
  "man-db-manual|gz|/usr/share/doc/man-db/man-db-manual.txt.gz"
  "grep-manual|info|/usr/share/info/grep.info.gz"
  "sed-manual|info|/usr/share/info/sed.info.gz"
  "gzip-manual|info|/usr/share/info/gzip.info.gz"
  "bash-man|man|bash"
)

# Collapses blank-line runs, strips trailing blanks and form feeds, drops invalid UTF-8.
normalise() {
  tr -d '\f\r' | sed -e 's/[[:space:]]*$//' | cat -s | iconv -f UTF-8 -t UTF-8 -c
}

# Info files: drop the \x1f node separators, "File: ... Node: ..." headers, tag tables and menus.
strip_info() {
  tr -d '\000\010\037\177' | sed -e 's/\[index\]//g' | awk '
    /^Tag Table:/ { skip = 1 }
    /^End Tag Table/ { skip = 0; next }
    skip { next }
    /^File: .*Node: / { next }
    /^\* Menu:/ { next }
    { print }'
}

package_of() {
  local p
  p=$(dpkg -S "$1" 2>/dev/null | head -n1 | cut -d: -f1) || true
  if [[ -n "$p" ]]; then
    printf '%s %s' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '?')"
  else
    printf 'unknown'
  fi
}

{
  echo "# quality corpus: sources"
  echo
  echo "Built by scripts/build-corpus.sh on $(date -u '+%Y-%m-%d %H:%M UTC') from files that"
  echo "Debian packages install on this machine."
  echo
  echo "| file | origin | package | bytes |"
  echo "| --- | --- | --- | ---: |"
} > "$out/SOURCES.md"

n=0
for s in "${sources[@]}"; do
  IFS='|' read -r name kind path <<< "$s"
  dst="$out/$name.txt"
  origin=$path
  case $kind in
    plain) if [[ -r $path ]]; then normalise < "$path" > "$dst"; fi ;;
    gz) if [[ -r $path ]]; then zcat "$path" | normalise > "$dst"; fi ;;
    info)
      if [[ -r $path ]]; then
        base=${path%.gz}
        { zcat "$path"; for part in "$base"-[0-9]*.gz; do if [[ -r $part ]]; then zcat "$part"; fi; done; } |
          strip_info | normalise > "$dst"
      fi ;;
    man)
      if command -v man > /dev/null && origin=$(man -w "$path" 2> /dev/null); then
        MANWIDTH=80 MAN_KEEP_FORMATTING=0 man --no-hyphenation --no-justification -P cat "$path" \
          2> /dev/null | col -bx | normalise > "$dst" || rm -f "$dst"
      fi ;;
  esac
  if [[ -s $dst ]]; then
    bytes=$(wc -c < "$dst")
    echo "| $name.txt | $origin | $(package_of "$origin") | $bytes |" >> "$out/SOURCES.md"
    n=$((n + 1))
  else
    rm -f "$dst"
    echo "build-corpus: skipping $name ($path not on this machine)" >&2
  fi
done

if (( n < 4 )); then
  echo "build-corpus: only $n documents found; pass --corpus FILE to ferry-bench quality" >&2
  exit 1
fi
echo "build-corpus: $n documents in $out (see $out/SOURCES.md)"
