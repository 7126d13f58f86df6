#!/usr/bin/env bash
# Builds target/debian/gptossd_<version>_<arch>.deb with dpkg-deb, from the binaries already in
# target/release (run `cargo build --release --locked` first) and the files of this checkout:
#
#   /usr/bin/gptossd, /usr/bin/gptossd-stage   target/release, stripped
#   /lib/systemd/system/gptossd.service        systemd/gptossd.service (not enabled on install)
#   /usr/lib/sysusers.d/gptossd.conf           packaging/sysusers.d/gptossd.conf
#   /etc/gptossd/gptossd.toml                  packaging/gptossd.toml, a conffile
#   /usr/share/doc/gptossd/                    README.md, copyright (with the linked crates'
#                                              licenses), changelog.gz, examples/haproxy.cfg
#   /usr/share/man/man1/gptossd{,-stage}.1.gz  manual pages: each command's --help
#   /usr/share/gptossd/getting-started.txt     what postinst prints on a first install
#   /var/lib/gptossd                           the state directory (postinst hands it to gptossd)
#   DEBIAN/                                    packaging/debian/: control (version from Cargo
#                                              metadata, Depends from dpkg-shlibdeps), conffiles,
#                                              postinst, prerm, postrm
#
# Prints the path of the .deb on its last line. Needs dpkg-deb, python3 and cargo; uses
# dpkg-shlibdeps (dpkg-dev) when present, else depends on libc6 (>= this machine's glibc).
# DEB_MAINTAINER overrides the Maintainer field.
set -euo pipefail
cd "$(dirname "$0")/.."

release=target/release
out=target/debian
maintainer=${DEB_MAINTAINER:-"gptossd maintainers <maintainers@users.noreply.r-seed-467aa17c.example>"}

say() { printf 'build-deb: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The version of the gptossd crate, from Cargo metadata; the binaries must be that version.
version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "gptossd"))')
for bin in gptossd gptossd-stage; do
    [ -x "$release/$bin" ] || die "$release/$bin is missing: run cargo build --release --locked"
done
built=$("$release/gptossd" --version)
[ "$built" = "gptossd $version" ] ||
    die "$release/gptossd says '$built', Cargo.toml says $version: run cargo build --release --locked"
arch=$(dpkg --print-architecture)
# Dates come from the last commit, so that two builds of one commit give the same package.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git describe --always --dirty 2>/dev/null || echo unknown)

name=gptossd_${version}_${arch}
root=$out/$name
deb=$out/$name.deb
say "staging $root (version $version, commit $commit)"
rm -rf "$root" "$deb"
mkdir -p "$root/DEBIAN"

# Files. The binaries are stripped as dh_strip does (Debian policy 10.1; from ~70 MB to 13):
# a panic's backtrace then has no function names.
install -D -m 0755 "$release/gptossd" "$root/usr/bin/gptossd"
install -D -m 0755 "$release/gptossd-stage" "$root/usr/bin/gptossd-stage"
strip --remove-section=.comment --remove-section=.note "$root"/usr/bin/*
install -D -m 0644 systemd/gptossd.service "$root/lib/systemd/system/gptossd.service"
install -D -m 0644 packaging/sysusers.d/gptossd.conf "$root/usr/lib/sysusers.d/gptossd.conf"
install -D -m 0644 packaging/gptossd.toml "$root/etc/gptossd/gptossd.toml"
doc=$root/usr/share/doc/gptossd
# The README stays uncompressed: the unit's Documentation= names /usr/share/doc/gptossd/README.md.
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 packaging/haproxy/gptossd.cfg "$doc/examples/haproxy.cfg"
install -D -m 0644 packaging/debian/getting-started.txt "$root/usr/share/gptossd/getting-started.txt"
install -d -m 0755 "$root/var/lib/gptossd"

# Manual pages: the binaries' own --help text, verbatim, so that they cannot drift apart;
# gptossd's page has every subcommand's (a line "@@SS TITLE" starts a subsection).
man_page() { # NAME SUMMARY, then the text on stdin
    printf '.TH %s 1 "%s" "gptossd %s" "User Commands"\n' "${1^^}" \
        "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" "$version"
    printf '.SH NAME\n%s \\- %s\n.SH DESCRIPTION\n.nf\n' "$1" "$2"
    sed -e 's/\\/\\e/g' -e "s/^[.']/\\\\\&&/" -e 's/^@@SS \(.*\)$/.fi\n.SS \1\n.nf/'
    printf '.fi\n.SH SEE ALSO\n/usr/share/doc/gptossd/README.md\n'
}
man=$root/usr/share/man/man1
mkdir -p "$man"
# A binary's help, then each of its subcommands' in a subsection.
help_pages() { # BINARY
    local commands
    commands=$("$release/$1" --help | awk '/^Commands:/ { on = 1; next } /^$/ { on = 0 }
        on && $1 != "help" { print $1 }')
    "$release/$1" --help
    for c in $commands; do
        printf '@@SS %s %s\n' "$1" "$c"
        "$release/$1" "$c" --help
    done
}
help_pages gptossd |
    man_page gptossd "local inference daemon for OpenAI's GPT-OSS models" | gzip -9n >"$man/gptossd.1.gz"
help_pages gptossd-stage |
    man_page gptossd-stage "model computation of gptossd: stage worker, in-process generator and bench (started by gptossd)" |
    gzip -9n >"$man/gptossd-stage.1.gz"
chmod 0644 "$man"/*.gz

# copyright: the project's license, and the crates linked into the binaries with theirs.
target=$(rustc -vV | sed -n 's/^host: //p')
crates=$(cargo tree --locked -e normal,no-proc-macro --target "$target" -p gptossd -p gptossd-stage \
        --prefix none --no-dedupe --format '{p}: {l}' |
    grep -v -e '^$' -e ' (/' | sort -u | sed 's/^/ /')
[ -n "$crates" ] || die "cargo tree listed no crates"
year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
awk -v crates="$crates" -v year="$year" '$0 == "@CRATES@" { print crates; next }
    { sub("@YEAR@", year); print }' packaging/debian/copyright >"$doc/copyright"
chmod 0644 "$doc/copyright"

# changelog.gz (a native package's): one entry for this build.
{
    printf 'gptossd (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Built from commit %s by packaging/build-deb.sh.\n\n' "$commit"
    printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# Depends: from the libraries the binaries link (dpkg-shlibdeps reads a debian/control, so it
# runs in a scratch directory that has one).
if command -v dpkg-shlibdeps >/dev/null; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    mkdir "$scratch/debian"
    printf 'Source: gptossd\n\nPackage: gptossd\nArchitecture: any\n' >"$scratch/debian/control"
    abs=$(realpath "$root")
    depends=$(cd "$scratch" && dpkg-shlibdeps -O "$abs/usr/bin/gptossd" "$abs/usr/bin/gptossd-stage" |
        sed -n 's/^shlibs:Depends=//p')
else
    glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
    depends="libc6 (>= $glibc)"
    say "dpkg-shlibdeps not found (package dpkg-dev): Depends: $depends"
fi
[ -n "$depends" ] || die "no Depends computed"

# DEBIAN/: control with the computed fields, conffiles and the maintainer scripts.
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
    packaging/debian/control >"$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
# md5sums of every file but the conffile (dpkg keeps its own record of that one).
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

# Every path dated from the commit; owned by root in the archive whoever builds it.
find "$root" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
say "Depends: $depends"
echo "$deb"
