#!/bin/sh
# The C sources are formatted as .clang-format says: every .c and .h file
# under lib/, include/, tests/, tools/ and examples/ is what clang-format
# makes of it. Skipped (77) without clang-format, or with a major version
# other than the one the tree was formatted with (Debian 12's 14), since
# versions format some constructs differently.
set -u
src=${top_srcdir:-.}
cf=${CLANG_FORMAT:-clang-format}
command -v "$cf" >/dev/null 2>&1 || { echo "no $cf: skipped"; exit 77; }
major=$("$cf" --version | sed -n 's/.*version \([0-9]*\).*/\1/p')
[ "$major" = 14 ] || { echo "$cf is version $major, the tree's is 14: skipped"; exit 77; }
cd "$src" || exit 99
files=$(find lib include tests tools examples -name '*.[ch]' | sort)
bad=0
for f in $files; do
	if ! "$cf" --dry-run --Werror "$f" >/dev/null 2>&1; then
		echo "not formatted: $f (clang-format -i $f)"
		bad=1
	fi
done
[ "$bad" = 0 ] && echo "$(echo "$files" | wc -l) files formatted as .clang-format says"
exit $bad
