#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# vm-test.sh - build and test the UFFDIO_MOVE cross-mm series in a VM.
#
# Owns: everything needed to check the kernel series kept next to this script
# (src/kmod-patch/0001-*.patch ...) on a fresh Debian 12 machine. It does not
# touch the Rust workspace and keeps all state outside the repository.
#
# What it does:
#   1. installs what it needs with apt (linux-source-6.12, qemu, build tools)
#   2. extracts the Debian linux-source-6.12 tree into the cache dir and
#      commits it to git (tag "pristine"); applies the series with git am on
#      a branch named after the series hash
#   3. builds two tinyconfig-based debug kernels (lockdep, DEBUG_VM) from that
#      one tree: "base" (pristine) and "patched", each in its own O= dir; the
#      patched build is seeded from the base build so it is incremental.
#      Both are cached, keyed by the package version, the config and (patched)
#      the series hash. The uffd selftests are built static from each tree.
#   4. boots each kernel in qemu (KVM only if a short probe boot succeeds,
#      otherwise TCG) with a busybox initramfs and runs:
#        - the 6.12 uffd-unit-tests and uffd-stress (anon, shmem, hugetlb) on
#          both kernels; a test that fails on the patched kernel is a failure
#        - the new cross-mm rows (uffd-unit-tests -f move-cross-mm, built
#          from the patched tree): must pass on the patched kernel and must
#          skip ("feature missing") on the base kernel
#        - lockdep must still be enabled and the kernel log free of
#          WARNING/BUG/lockdep splats after the tests
#        - optional uswap end-to-end tests (USWAP_E2E_DIR / USWAP_E2E_CMD /
#          USWAP_E2E_CMDS), with dynamically linked host binaries and their
#          libraries copied in at the same paths (USWAP_E2E_BUNDLE)
#   5. prints a pass/fail table; exit status 0 only if every row passed.
#      A test that could not run counts as a failure.
#
# Environment:
#   USWAP_KERNEL_CACHE  cache dir (default ${XDG_CACHE_HOME:-/var/cache}/uswap-kernel)
#   USWAP_VM_ACCEL      auto (default) | tcg | kvm
#   USWAP_E2E_DIR       dir of static binaries: each is copied into the patched
#                       VM and run as one row (cwd /e2e, must exit 0)
#   USWAP_E2E_BUNDLE    space-separated host files (executables, shared objects)
#                       copied into the patched VM at the same absolute paths,
#                       with every library ldd reports for them and the dynamic
#                       loader, so dynamically linked programs run there
#   USWAP_E2E_CMD       a shell command run in the patched VM (row "e2e cmd")
#   USWAP_E2E_CMDS      newline-separated "name: command" lines, each its own
#                       row "e2e name" (blank lines and #-lines are skipped)
#                       All e2e rows run with cwd /e2e, as root, stdin
#                       /dev/null, PATH=<bundle dirs>:/bin:/sbin HOME=/tmp
#                       TMPDIR=/tmp USWAP_E2E_IN_VM=1 RUST_BACKTRACE=1 (a
#                       command with sh: a bundled /bin/sh replaces busybox's
#                       for them, a bundled /usr/bin/setpriv busybox's one);
#                       a row passes only if it exits 0; its output is in
#                       the VM log and
#                       $LOGDIR/e2e-<name>.txt, the tail of a failing one is
#                       printed under the table; processes it leaves behind
#                       are killed before the next row
#   USWAP_E2E_REQUIRED  1: it is a failure if no e2e test was given
#   USWAP_E2E_TIMEOUT   seconds per e2e row (default 900: TCG is slow)
#   USWAP_VM_TIMEOUT    seconds per VM run (default 900, plus USWAP_E2E_TIMEOUT
#                       per e2e row in the patched VM; each selftest: 400)
#   USWAP_VM_MEM        qemu -m (default 2G)
#   JOBS                make -j (default: nproc)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${USWAP_KERNEL_CACHE:-${XDG_CACHE_HOME:-/var/cache}/uswap-kernel}
JOBS=${JOBS:-$(nproc)}
ACCEL=${USWAP_VM_ACCEL:-auto}
VM_TIMEOUT=${USWAP_VM_TIMEOUT:-}
VM_MEM=${USWAP_VM_MEM:-2G}
E2E_TIMEOUT=${USWAP_E2E_TIMEOUT:-900}
NICE=(nice -n 19)
GIT=(git -c user.name=uswap-vm-test -c user.email=vm-test@localhost
	-c advice.detachedHead=false)
PKG=linux-source-6.12
TARBALL=/usr/src/linux-source-6.12.tar.xz
DEB_PKGS=(qemu-system-x86 "$PKG" bc flex bison libelf-dev libssl-dev cpio
	busybox-static dwarves gcc make libc6-dev git xz-utils gzip)
NEW_TESTS=(move-cross-mm move-cross-mm-thp move-cross-mm-busy move-cross-mm-race
	move-cross-mm-swap move-cross-mm-memcg)
# uffd-stress runs: "type MiB bounces" (same on both kernels)
STRESS=("anon 32 8" "shmem 32 8" "hugetlb 32 8")

T0=$(date +%s)
ROWS=()
FAILS=0
TAILS=()	# failing e2e rows' last output lines, printed under the table

log() { echo "[vm-test $(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 2; }
# row NAME STATUS DETAIL: STATUS is PASS, FAIL or INFO (INFO is not counted)
row() {
	ROWS+=("$1|$2|$3")
	[ "$2" = FAIL ] && FAILS=$((FAILS + 1))
	return 0
}

# Kernel configuration: tinyconfig plus what the VM and the tests need.
# KCMP: uswap's shim checks with kcmp(KCMP_FILE) that its descriptors are still
# its own; without the syscall it detaches and the program runs unmanaged.
KCONFIG='
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_PRINTK=y
CONFIG_PRINTK_TIME=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_PROC_FS=y
CONFIG_PROC_PAGE_MONITOR=y
CONFIG_SYSFS=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_SHMEM=y
CONFIG_TMPFS=y
CONFIG_MEMFD_CREATE=y
CONFIG_USERFAULTFD=y
CONFIG_PTE_MARKER_UFFD_WP=y
CONFIG_TRANSPARENT_HUGEPAGE=y
CONFIG_CGROUPS=y
CONFIG_MEMCG=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_EVENTFD=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_POSIX_TIMERS=y
CONFIG_ADVISE_SYSCALLS=y
CONFIG_FILE_LOCKING=y
CONFIG_NET=y
CONFIG_UNIX=y
CONFIG_MULTIUSER=y
CONFIG_KSM=y
CONFIG_HUGETLBFS=y
CONFIG_BLOCK=y
CONFIG_SWAP=y
CONFIG_BLK_DEV=y
CONFIG_BLK_DEV_RAM=y
CONFIG_IO_URING=y
CONFIG_DEBUG_KERNEL=y
CONFIG_DEBUG_VM=y
CONFIG_PROVE_LOCKING=y
CONFIG_DEBUG_ATOMIC_SLEEP=y
CONFIG_DEBUG_FS=y
CONFIG_GUP_TEST=y
CONFIG_KCMP=y
'

ensure_deps() {
	local missing=() p
	for p in "${DEB_PKGS[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
			grep -q "install ok installed" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		[ "$(id -u)" = 0 ] || die "missing packages (need root to install): ${missing[*]}"
		log "apt-get install ${missing[*]}"
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends "${missing[@]}" >/dev/null
	fi
	[ -f "$TARBALL" ] || die "$TARBALL missing"
	PKGVER=$(dpkg-query -W -f='${Version}' "$PKG")
	BUSYBOX=$(command -v busybox || echo /bin/busybox)
	[ -x "$BUSYBOX" ] || die "busybox missing"
	# The initramfs has no libc: busybox must be the static one.
	! ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX is not static (install busybox-static)"
}

series_patches() {
	local p
	for p in "$HERE"/[0-9][0-9][0-9][0-9]-*.patch; do
		[ -e "$p" ] || continue
		case "$(basename "$p")" in 0000-*) continue ;; esac
		echo "$p"
	done
}

compute_keys() {
	mapfile -t PATCHES < <(series_patches)
	[ ${#PATCHES[@]} -gt 0 ] || die "no patches in $HERE"
	BASEKEY=$(printf '%s\n%s\n' "$PKGVER" "$KCONFIG" | sha256sum | cut -c1-12)
	KEY=$( (echo "$BASEKEY"; cat "${PATCHES[@]}") | sha256sum | cut -c1-12)
}

prepare_src() {
	SRC=$CACHE/src/linux-source-6.12
	if [ "$(cat "$CACHE/src/.pkgver" 2>/dev/null)" != "$PKGVER" ] ||
	   ! "${GIT[@]}" -C "$SRC" rev-parse -q --verify pristine >/dev/null 2>&1; then
		log "extracting $PKG $PKGVER"
		rm -rf "$CACHE/src" "$CACHE"/build-* "$CACHE"/bin-*
		mkdir -p "$CACHE/src"
		tar -C "$CACHE/src" -xJf "$TARBALL"
		# Debian's .gitignore ignores the whole top level: add -f.
		"${GIT[@]}" -C "$SRC" init -q
		"${GIT[@]}" -C "$SRC" add -f .
		"${GIT[@]}" -C "$SRC" commit -q -m "Linux $PKGVER ($PKG)"
		"${GIT[@]}" -C "$SRC" tag pristine
		echo "$PKGVER" >"$CACHE/src/.pkgver"
	fi
}

checkout() {
	local variant=$1 br=uswap-$KEY
	if [ "$variant" = base ]; then
		"${GIT[@]}" -C "$SRC" checkout -q -f pristine
		return
	fi
	if "${GIT[@]}" -C "$SRC" rev-parse -q --verify "refs/heads/$br" >/dev/null; then
		"${GIT[@]}" -C "$SRC" checkout -q -f "$br"
		return
	fi
	"${GIT[@]}" -C "$SRC" checkout -q -f -B "$br" pristine
	if ! "${GIT[@]}" -C "$SRC" am -q --whitespace=nowarn "${PATCHES[@]}" \
		>"$CACHE/logs/git-am.log" 2>&1; then
		"${GIT[@]}" -C "$SRC" am --abort || true
		"${GIT[@]}" -C "$SRC" checkout -q -f pristine
		"${GIT[@]}" -C "$SRC" branch -D "$br" >/dev/null || true
		cat "$CACHE/logs/git-am.log" >&2
		row "series applies to $PKG $PKGVER" FAIL "git am failed"
		return 1
	fi
}

build_selftests() {
	local obj=$1 bin=$2 t
	local mmdir=$SRC/tools/testing/selftests/mm
	rm -rf "$bin" && mkdir -p "$bin"
	for t in uffd-unit-tests uffd-stress; do
		(cd "$mmdir" && "${NICE[@]}" gcc -static -Wall -O2 -I ../../../.. \
			-isystem "$obj/usr/include" \
			-isystem ../../../../tools/include/uapi -U_FORTIFY_SOURCE \
			-no-pie "$t.c" uffd-common.c vm_util.c thp_settings.c \
			-lrt -lpthread -lm -o "$bin/$t") \
			>>"$CACHE/logs/selftests-$(basename "$bin").log" 2>&1 || return 1
	done
}

# build VARIANT: the kernel and the static selftests of one variant
build() {
	local variant=$1 want obj bin t1 o
	obj=$CACHE/build-$variant
	bin=$CACHE/bin-$variant
	if [ "$variant" = base ]; then want=$BASEKEY; else want=$KEY; fi
	if [ "$(cat "$obj/.uswap-key" 2>/dev/null)" = "$want" ] &&
	   [ -f "$obj/arch/x86/boot/bzImage" ] && [ -x "$bin/uffd-unit-tests" ]; then
		row "build $variant kernel" PASS "cached ($want)"
		return 0
	fi
	t1=$(date +%s)
	checkout "$variant" || return 1
	if [ "$variant" = patched ] && [ ! -f "$obj/.config" ] &&
	   [ -f "$CACHE/build-base/.uswap-key" ]; then
		log "seeding the patched build from the base build"
		cp -a "$CACHE/build-base" "$obj"
	fi
	rm -f "$obj/.uswap-key"
	mkdir -p "$obj"
	printf '%s' "$KCONFIG" >"$CACHE/uswap.config"
	log "building $variant kernel (make -j$JOBS, log: $CACHE/logs/build-$variant.log)"
	if ! (cd "$SRC" && make -s O="$obj" tinyconfig &&
	      ./scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" \
			"$CACHE/uswap.config" &&
	      make -s O="$obj" olddefconfig) >"$CACHE/logs/build-$variant.log" 2>&1; then
		row "build $variant kernel" FAIL "configure failed"
		return 1
	fi
	for o in $(grep '=y' "$CACHE/uswap.config" | sed 's/=y//'); do
		if ! grep -q "^$o=y" "$obj/.config"; then
			row "build $variant kernel" FAIL "$o not set in .config"
			return 1
		fi
	done
	if ! (cd "$SRC" && "${NICE[@]}" make O="$obj" -j"$JOBS" bzImage &&
	      "${NICE[@]}" make O="$obj" headers) >>"$CACHE/logs/build-$variant.log" 2>&1; then
		tail -30 "$CACHE/logs/build-$variant.log" >&2
		row "build $variant kernel" FAIL "make failed"
		return 1
	fi
	if ! build_selftests "$obj" "$bin"; then
		tail -30 "$CACHE/logs/selftests-bin-$variant.log" >&2
		row "build $variant selftests" FAIL "gcc failed"
		return 1
	fi
	echo "$want" >"$obj/.uswap-key"
	row "build $variant kernel" PASS "built in $(($(date +%s) - t1)) s ($want)"
}

qemu_cmd() {
	local kernel=$1 initrd=$2 accel=$3
	local cpu=()
	[ "$accel" = kvm ] && cpu=(-cpu host)
	# tsc=reliable: under TCG the two sockets' TSCs look unsynchronised, and the kernel
	# would fall back to the jiffies clocksource (4 ms steps): every timing would be noise.
	echo qemu-system-x86_64 -accel "$accel" "${cpu[@]}" -m "$VM_MEM" \
		-smp cpus=2,sockets=2 -nographic -no-reboot -kernel "$kernel" \
		-initrd "$initrd" \
		-append "'console=ttyS0 panic=-1 quiet brd.rd_nr=1 brd.rd_size=65536 tsc=reliable'"
}

# initrd DIR: pack DIR into DIR.cpio.gz
pack_initrd() {
	(cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 >"$1.cpio.gz")
}

# A tiny initramfs that only proves the kernel reaches /init.
probe_accel() {
	local key f d kernel=$CACHE/build-base/arch/x86/boot/bzImage
	if [ "$ACCEL" != auto ]; then
		row "qemu accelerator" INFO "$ACCEL (USWAP_VM_ACCEL)"
		return
	fi
	ACCEL=tcg
	if [ ! -w /dev/kvm ]; then
		row "qemu accelerator" INFO "tcg (no /dev/kvm)"
		return
	fi
	key=$(uname -r)-$(qemu-system-x86_64 --version | head -1 | md5sum | cut -c1-8)
	f=$CACHE/kvm-probe.$key
	if [ ! -f "$f" ]; then
		log "probing KVM (20 s timeout)"
		d=$CACHE/run/probe
		rm -rf "$d" && mkdir -p "$d/bin"
		cp "$BUSYBOX" "$d/bin/busybox"
		printf '#!/bin/busybox sh\n/bin/busybox echo @@PROBE_OK\n/bin/busybox reboot -f\n' >"$d/init"
		chmod +x "$d/init"
		pack_initrd "$d"
		if eval "timeout 20 $(qemu_cmd "$kernel" "$d.cpio.gz" kvm)" \
			</dev/null 2>&1 | grep -q @@PROBE_OK; then
			echo kvm >"$f"
		else
			echo tcg >"$f"
		fi
	fi
	ACCEL=$(cat "$f")
	row "qemu accelerator" INFO "$ACCEL (KVM probe result cached in $f)"
}

# --- the e2e bundle: host files at the same absolute paths in the initramfs ---
# All writes go below $BROOT; every symlink made there is relative, so a path
# below $BROOT never leads out of it.

# in_root PATH: die unless $BROOT$PATH stays below $BROOT
in_root() {
	case "$(realpath -m "$BROOT$1")/" in "$BROOT"/*) ;; *) die "bundle: $1 leads out of $BROOT" ;; esac
}

# mirror_dir DIR: make DIR exist in $BROOT as on the host; a directory that is
# a symlink on the host (/lib -> usr/lib) becomes the same link (made relative)
mirror_dir() {
	local d=$1 real
	[ "$d" = / ] && return 0
	[ -e "$BROOT$d" ] && return 0
	mirror_dir "$(dirname "$d")"
	in_root "$d"
	if [ -L "$d" ]; then
		real=$(readlink -f "$d")
		mirror_dir "$real"
		ln -s "$(realpath --relative-to="$(readlink -f "$(dirname "$d")")" "$real")" "$BROOT$d"
	else
		mkdir -p "$BROOT$d"
	fi
}

# bundle_file PATH: the real file at PATH (symlinks resolved); if PATH is a
# symlink, what it resolves to gets the same file (a hard link) as well
bundle_file() {
	local p=$1 real
	[ -e "$BROOT$p" ] && return 0
	if [ ! -f "$p" ]; then
		BUNDLE_ERR+=("$p: no such file")
		return 1
	fi
	mirror_dir "$(dirname "$p")"
	in_root "$p"
	cp -L --preserve=mode,timestamps "$p" "$BROOT$p"
	BUNDLE_FILES+=("$p")
	if [ -L "$p" ]; then
		real=$(readlink -f "$p")
		mirror_dir "$(dirname "$real")"
		in_root "$real"
		[ -e "$BROOT$real" ] || ln "$BROOT$p" "$BROOT$real"
	fi
}

# bundle_deps PATH: the libraries and the loader ldd reports for PATH
bundle_deps() {
	local p=$1 out lib
	# static binaries and scripts: "not a dynamic executable", nothing to add
	out=$(LC_ALL=C ldd "$p" 2>&1) || return 0
	if echo "$out" | grep -q 'not found'; then
		BUNDLE_ERR+=("$p: $(echo "$out" | grep 'not found' | tr -s ' \t' ' ' | tr '\n' ';')")
	fi
	# "libc.so.6 => /lib/.../libc.so.6 (0x...)" and the loader
	# "/lib64/ld-linux-x86-64.so.2 (0x...)"; ldd lists indirect needs too
	for lib in $(echo "$out" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
		case " ${BUNDLE_LIBS[*]} " in *" $lib "*) ;; *) BUNDLE_LIBS+=("$lib") ;; esac
		bundle_file "$lib"
	done
}

# bundle ROOT: copy $USWAP_E2E_BUNDLE into ROOT; sets BUNDLE_PATH (the dirs
# of the bundled files but /bin and /sbin, for PATH) and BUNDLE_ROW
# (status|detail of its row). A bundled /bin/sh replaces busybox's sh for the
# e2e rows (busybox --install does not overwrite files).
bundle() {
	local f abs dirs=()
	BROOT=$(realpath "$1")
	BUNDLE_ERR=() BUNDLE_FILES=() BUNDLE_LIBS=() BUNDLE_PATH=
	for f in $USWAP_E2E_BUNDLE; do
		abs=$(realpath -s "$f")
		bundle_file "$abs" || continue
		bundle_deps "$abs"
		# /bin (busybox's applets, and any bundled /bin file) goes last in
		# PATH, so that a bundled /usr/bin/setpriv beats busybox's setpriv
		case " /bin /sbin ${dirs[*]} " in *" $(dirname "$abs") "*) ;; *) dirs+=("$(dirname "$abs")") ;; esac
	done
	BUNDLE_PATH=$(IFS=:; echo "${dirs[*]}")
	if [ ${#BUNDLE_ERR[@]} -gt 0 ]; then
		BUNDLE_ROW="FAIL|$(printf '%s; ' "${BUNDLE_ERR[@]}" | tr -d '|')"
	else
		BUNDLE_ROW="PASS|${#BUNDLE_FILES[@]} files, $(($(cat "${BUNDLE_FILES[@]}" | wc -c) >> 20)) MiB; libs: ${BUNDLE_LIBS[*]}"
	fi
}

# Files glibc programs expect; the e2e rows run as root.
write_etc() {
	mkdir -p "$1"/{etc,root,run,dev,proc,sys,tmp}
	chmod 1777 "$1/tmp"
	printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
		'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$1/etc/passwd"
	printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nogroup:x:65534:' >"$1/etc/group"
	printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' \
		'hosts: files' >"$1/etc/nsswitch.conf"
	printf '%s\n' '127.0.0.1 localhost' '::1 localhost' >"$1/etc/hosts"
	echo uswap-vm >"$1/etc/hostname"
}

write_init() {
	cat >"$1/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs -o mode=1777 tmp /tmp
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
# devtmpfs makes /dev/userfaultfd (misc device, CONFIG_USERFAULTFD); if not, mknod
if [ ! -c /dev/userfaultfd ] && [ -r /sys/class/misc/userfaultfd/dev ]; then
	IFS=: read -r ma mi </sys/class/misc/userfaultfd/dev
	mknod -m 600 /dev/userfaultfd c "$ma" "$mi"
fi
[ -c /dev/userfaultfd ] && uffd_dev=yes || uffd_dev=no
hostname uswap-vm
mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo 64 >/proc/sys/vm/nr_hugepages
# 64 MiB of swap on a RAM disk, for the swapped-out-page test
mkswap /dev/ram0 >/dev/null 2>&1 && swapon /dev/ram0
echo "@@KERNEL $(uname -r) hugepages=$(cat /proc/sys/vm/nr_hugepages) swap_kB=$(awk '/SwapTotal/ {print $2}' /proc/meminfo) /dev/userfaultfd=$uffd_dev"
run() {
	name=$1; shift
	echo "@@BEGIN $name"
	s=$(date +%s)
	timeout 400 "$@" </dev/null 2>&1
	rc=$?
	echo "@@END $name rc=$rc secs=$(($(date +%s) - s))"
}
# reap: kill what an e2e row left running (all user processes but init);
# no fork in here, so nothing of ours is hit. Sets REAPED.
reap() {
	REAPED=
	for p in /proc/[0-9]*; do
		pid=${p#/proc/}
		[ "$pid" = 1 ] && continue
		[ -e "$p/exe" ] || continue	# kernel threads, zombies
		comm=
		read -r comm <"$p/comm" 2>/dev/null
		kill -9 "$pid" 2>/dev/null || continue
		# the watcher child of busybox timeout lingers up to 1 s: not a leftover
		[ "$comm" = timeout ] || REAPED="$REAPED $comm[$pid]"
	done
	[ -z "$REAPED" ] || sleep 1
}
# run_e2e NAME PROG ARGS: like run, with E2E_TIMEOUT, and leftovers killed
run_e2e() {
	name=$1; shift
	echo "@@BEGIN $name"
	s=$(date +%s)
	timeout "$E2E_TIMEOUT" "$@" </dev/null 2>&1
	rc=$?
	# the output may end without a newline: keep @@END at a line start
	echo
	reap
	echo "@@END $name rc=$rc secs=$(($(date +%s) - s)) left=$(echo $REAPED | tr ' ' ,)"
}
. /plan
echo "@@LOCKDEP $(grep -s 'debug_locks:' /proc/lockdep_stats | tr -s ' ' | sed 's/^ //')"
echo "@@DMESG_BEGIN"
dmesg
echo "@@DMESG_END"
echo "@@DONE"
reboot -f
EOF
	chmod +x "$1/init"
}

# e2e_cmds: the "name: command" rows of USWAP_E2E_CMD and USWAP_E2E_CMDS into
# CMD_NAMES / CMD_TEXTS (a name is [A-Za-z0-9_.+=@/-]+; a line without one
# is named cmdN; a repeated name gets -2, -3 ...)
e2e_cmds() {
	local line n=0 name cmd k
	CMD_NAMES=() CMD_TEXTS=()
	declare -A seen=()
	if [ -n "${USWAP_E2E_CMD:-}" ]; then
		CMD_NAMES+=(cmd) CMD_TEXTS+=("$USWAP_E2E_CMD") seen[cmd]=1
	fi
	while IFS= read -r line; do
		n=$((n + 1))
		[[ $line =~ ^[[:space:]]*(#|$) ]] && continue
		if [[ $line =~ ^[[:space:]]*([A-Za-z0-9_.+=@/-]+):[[:space:]]+(.*[^[:space:]]) ]]; then
			name=${BASH_REMATCH[1]} cmd=${BASH_REMATCH[2]}
		else
			name=cmd$n cmd=$line
			log "USWAP_E2E_CMDS line $n has no 'name: ' prefix, running it as e2e $name"
		fi
		k=$name
		if [ -n "${seen[$k]:-}" ]; then
			k=2
			while [ -n "${seen[$name-$k]:-}" ]; do k=$((k + 1)); done
			k=$name-$k
		fi
		seen[$k]=1
		CMD_NAMES+=("$k") CMD_TEXTS+=("$cmd")
	done <<<"${USWAP_E2E_CMDS:-}"
}

# e2e_plan DIR: the e2e part of DIR/plan; sets E2E_PLANNED (the row names)
e2e_plan() {
	local d=$1 s i name
	E2E_PLANNED=()
	if [ -n "${USWAP_E2E_BUNDLE:-}" ]; then
		bundle "$d"
	fi
	mkdir -p "$d/e2e-cmds"
	printf 'export PATH=%q HOME=/tmp TMPDIR=/tmp USER=root LOGNAME=root SHELL=/bin/sh USWAP_E2E_IN_VM=1 RUST_BACKTRACE=1\n' \
		"${BUNDLE_PATH:+$BUNDLE_PATH:}/bin:/sbin"
	echo "E2E_TIMEOUT=$E2E_TIMEOUT"
	echo "cd /e2e"
	if [ -n "${USWAP_E2E_DIR:-}" ]; then
		cp -a "$USWAP_E2E_DIR"/. "$d/e2e/"
		for s in "$USWAP_E2E_DIR"/*; do
			[ -f "$s" ] && [ -x "$s" ] || continue
			name=$(basename "$s" | tr -c 'A-Za-z0-9_.+=@/\n-' _)
			E2E_PLANNED+=("$name")
			printf "run_e2e 'e2e %s' ./%q\n" "$name" "$(basename "$s")"
		done
	fi
	for i in "${!CMD_NAMES[@]}"; do
		printf '%s\n' "${CMD_TEXTS[$i]}" >"$d/e2e-cmds/$i.sh"
		E2E_PLANNED+=("${CMD_NAMES[$i]}")
		echo "run_e2e 'e2e ${CMD_NAMES[$i]}' sh /e2e-cmds/$i.sh"
	done
}

# run_vm VARIANT: boot the kernel of VARIANT with all tests, log to $LOGDIR
run_vm() {
	local variant=$1 d t1 s timeout=$VM_TIMEOUT
	d=$CACHE/run/$variant
	rm -rf "$d" "$d.cpio.gz"
	mkdir -p "$d"/{bin,proc,sys,dev,tmp,t/base,t/patched,e2e}
	write_etc "$d"
	cp "$BUSYBOX" "$d/bin/busybox"
	cp "$CACHE"/bin-base/* "$d/t/base/"
	cp "$CACHE/bin-patched/uffd-unit-tests" "$d/t/patched/"
	write_init "$d"
	# The 6.12 selftest is not fully reliable under TCG on a busy host: it maps its shmem
	# areas at a fixed hint address (BASE_PMD_ADDR, "TODO: clean this up" upstream) and aborts
	# when something already sits there, and its "events" test once got ENOENT from a COPY
	# on the unpatched kernel. An aborted run is run once more, on both kernels alike; the
	# log keeps the first run's end. A failure that repeats still fails the row.
	cat >"$d/t/unit-retry.sh" <<'EOS'
"$@" >/tmp/unit-1.txt 2>&1
rc=$?
if [ "$rc" != 0 ]; then
	echo "(first run aborted with rc=$rc; its last lines, then a second run)"
	tail -3 /tmp/unit-1.txt | sed "s/^/# first run: /"
	"$@"
	exit $?
fi
cat /tmp/unit-1.txt
exit $rc
EOS
	{
		echo "cd /t"
		echo "run unit /bin/sh /t/unit-retry.sh base/uffd-unit-tests"
		for s in "${STRESS[@]}"; do
			echo "run 'stress ${s%% *}' base/uffd-stress $s"
		done
		echo "run new patched/uffd-unit-tests -f move-cross-mm"
	} >"$d/plan"
	if [ "$variant" = patched ] && [ "$E2E" = 1 ]; then
		# no subshell: e2e_plan sets E2E_PLANNED and adds rows
		e2e_plan "$d" >"$d/plan.e2e"
		cat "$d/plan.e2e" >>"$d/plan"
		[ -n "$timeout" ] || timeout=$((900 + ${#E2E_PLANNED[@]} * E2E_TIMEOUT))
	fi
	[ -n "$timeout" ] || timeout=900
	pack_initrd "$d"
	t1=$(date +%s)
	log "booting $variant kernel ($ACCEL, -m $VM_MEM, timeout $timeout s), log: $LOGDIR/vm-$variant.log"
	eval "timeout $timeout $(qemu_cmd "$CACHE/build-$variant/arch/x86/boot/bzImage" \
		"$d.cpio.gz" "$ACCEL")" </dev/null >"$LOGDIR/vm-$variant.log" 2>&1 || true
	tr -d '\r' <"$LOGDIR/vm-$variant.log" >"$LOGDIR/vm-$variant.txt"
	VMSECS[$variant]=$(($(date +%s) - t1))
}

# section LOG NAME: the output of one @@BEGIN/@@END block
section() {
	awk -v n="$2" '$0 == "@@BEGIN " n {p=1; next} p && index($0, "@@END " n " ") == 1 {exit} p' "$1"
}
end_rc() {
	grep -a "^@@END $2 rc=" "$1" | sed 's/.* rc=\([0-9]*\).*/\1/' | head -1
}
end_secs() {
	grep -a "^@@END $2 rc=" "$1" | sed 's/.*secs=\([0-9]*\).*/\1/' | head -1
}
# unit_results LOG NAME: "test on mem|done/skipped/failed" per line
unit_results() {
	section "$1" "$2" | grep -a '^Testing .* on .*\.\.\. ' |
		sed -E 's/^Testing (.*)\.\.\. (done|skipped|failed).*/\1|\2/'
}

# evaluate_e2e LOG NAME: the row of one e2e test; its output goes to
# $LOGDIR/e2e-NAME.txt, a failing one's last lines to TAILS
evaluate_e2e() {
	local log=$1 name=$2 rc secs left out last detail
	out=$LOGDIR/e2e-${name//\//_}.txt
	# without colour escapes and trailing blank lines
	section "$log" "e2e $name" | sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g' |
		sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' >"$out"
	rc=$(end_rc "$log" "e2e $name")
	secs=$(end_secs "$log" "e2e $name")
	left=$(grep -a "^@@END e2e $name rc=" "$log" | head -1 | sed -n 's/.* left=\(.*\)/\1/p')
	if ! grep -aqxF "@@BEGIN e2e $name" "$log"; then
		row "patched: e2e $name" FAIL "did not run"
		return
	fi
	detail="${secs:-?} s"
	[ -n "$left" ] && detail="$detail; killed what it left running: $left"
	if [ "$rc" = 0 ]; then
		row "patched: e2e $name" PASS "$detail"
		return
	fi
	if [ -z "$rc" ]; then
		detail="no end (VM stopped or timed out)"
	elif [ "$rc" = 143 ] || [ "$rc" = 137 ] || [ "${secs:-0}" -ge "$E2E_TIMEOUT" ]; then
		detail="rc=$rc, timed out? (USWAP_E2E_TIMEOUT=$E2E_TIMEOUT), $detail"
	else
		detail="rc=$rc, $detail"
	fi
	last=$(grep -a . "$out" | tail -1 | tr -d '|' | cut -c1-100)
	row "patched: e2e $name" FAIL "$detail: $last"
	TAILS+=("--- e2e $name: last lines (all of it: $out)" "$(tail -25 "$out")")
}

evaluate_vm() {
	local variant=$1 log rc secs s name t r
	log=$LOGDIR/vm-$variant.txt
	if ! grep -aq '^@@DONE' "$log"; then
		log "$variant VM did not complete; last console lines:"
		tail -20 "$log" >&2
		row "$variant: VM ran to completion" FAIL \
			"no @@DONE after ${VMSECS[$variant]} s (see $LOGDIR/vm-$variant.log)"
	else
		row "$variant: VM ran to completion" PASS "${VMSECS[$variant]} s, $(grep -ao '@@KERNEL.*' "$log" | cut -d' ' -f2-)"
	fi
	# the 6.12 uffd-unit-tests
	rc=$(end_rc "$log" unit)
	secs=$(end_secs "$log" unit)
	s=$(section "$log" unit | grep -a '^Userfaults unit tests:' | sed 's/Userfaults unit tests: //')
	if [ -z "$rc" ]; then
		row "$variant: uffd-unit-tests (6.12)" FAIL "did not run"
	elif [ "$rc" != 0 ] && [ -z "$s" ]; then
		# err() in the test binary exits at once: name the test it was in
		row "$variant: uffd-unit-tests (6.12)" FAIL "rc=$rc, aborted: $(section "$log" unit | tail -2 | tr '\n' ' ')"
	elif [ "$rc" != 0 ]; then
		row "$variant: uffd-unit-tests (6.12)" FAIL "rc=$rc $s; failed: $(unit_results "$log" unit | grep '|failed' | cut -d'|' -f1 | tr '\n' ',')"
	elif ! echo "$s" | grep -q 'skip=0,'; then
		# a test that could not run is a failure, not a silent skip
		row "$variant: uffd-unit-tests (6.12)" FAIL "$s; skipped: $(unit_results "$log" unit | grep '|skipped' | cut -d'|' -f1 | tr '\n' ',')"
	else
		row "$variant: uffd-unit-tests (6.12)" PASS "$s, ${secs} s"
	fi
	for s in "${STRESS[@]}"; do
		name="stress ${s%% *}"
		rc=$(end_rc "$log" "$name")
		if [ -z "$rc" ]; then
			row "$variant: uffd-stress $s" FAIL "did not run"
		elif [ "$rc" != 0 ]; then
			row "$variant: uffd-stress $s" FAIL "rc=$rc"
		else
			row "$variant: uffd-stress $s" PASS "$(end_secs "$log" "$name") s"
		fi
	done
	# the new rows
	for t in "${NEW_TESTS[@]}"; do
		r=$(unit_results "$log" new | grep "^$t on anon|" | cut -d'|' -f2)
		if [ "$variant" = patched ]; then
			case "$r" in
			done) row "$variant: $t" PASS "" ;;
			"") row "$variant: $t" FAIL "did not run" ;;
			*) row "$variant: $t" FAIL "$r: $(section "$log" new | grep -a "^Testing $t on" | sed 's/.*\.\.\. //')" ;;
			esac
		else
			if [ "$r" = skipped ] && section "$log" new | grep -a "^Testing $t on" | grep -q 'feature missing'; then
				row "$variant: $t" PASS "skipped: feature missing (gating works)"
			else
				row "$variant: $t" FAIL "expected a feature-missing skip, got '${r:-nothing}'"
			fi
		fi
	done
	# e2e
	if [ "$variant" = patched ]; then
		if [ "$E2E" = 1 ]; then
			[ -z "$BUNDLE_ROW" ] ||
				row "patched: e2e bundle" "${BUNDLE_ROW%%|*}" "${BUNDLE_ROW#*|}"
			for name in "${E2E_PLANNED[@]}"; do
				evaluate_e2e "$log" "$name"
			done
			[ ${#E2E_PLANNED[@]} -gt 0 ] ||
				row "patched: uswap e2e" FAIL "nothing to run: USWAP_E2E_DIR had no executables, no USWAP_E2E_CMD(S)"
		elif [ "${USWAP_E2E_REQUIRED:-0}" = 1 ]; then
			row "patched: uswap e2e" FAIL "not run: set USWAP_E2E_DIR, USWAP_E2E_CMD or USWAP_E2E_CMDS"
		else
			row "patched: uswap e2e" INFO "not run (not requested; USWAP_E2E_REQUIRED=1 makes this a failure)"
		fi
	fi
	# lockdep and the kernel log
	s=$(grep -a '^@@LOCKDEP' "$log" | cut -d' ' -f2-)
	if [ "$s" = "debug_locks: 1" ]; then
		row "$variant: lockdep still enabled" PASS "$s"
	else
		row "$variant: lockdep still enabled" FAIL "'$s'"
	fi
	awk '/^@@DMESG_BEGIN/{p=1;next} /^@@DMESG_END/{p=0} p' "$log" >"$LOGDIR/dmesg-$variant.txt"
	s=$(grep -aE 'WARNING:|BUG:|Oops|possible circular|possible recursive|inconsistent lock|general protection|INFO: task .* blocked|Call Trace' \
		"$LOGDIR/dmesg-$variant.txt" | head -3 | tr '\n' ' ')
	if ! grep -aq '^@@DMESG_END' "$log"; then
		row "$variant: kernel log clean" FAIL "no kernel log captured"
	elif [ -n "$s" ]; then
		row "$variant: kernel log clean" FAIL "$s (see $LOGDIR/dmesg-$variant.txt)"
	else
		row "$variant: kernel log clean" PASS "no WARNING/BUG/lockdep splat"
	fi
}

# Rows that passed (or skipped) on base but failed on patched.
compare_unit() {
	local new
	new=$(join -t'|' <(unit_results "$LOGDIR/vm-base.txt" unit | sort -t'|' -k1,1) \
		<(unit_results "$LOGDIR/vm-patched.txt" unit | sort -t'|' -k1,1) |
		awk -F'|' '$2 != "failed" && $3 == "failed" {print $1}' | tr '\n' ',')
	if [ -n "$new" ]; then
		row "uffd-unit-tests: no new failure" FAIL "$new"
	else
		row "uffd-unit-tests: no new failure" PASS \
			"$(unit_results "$LOGDIR/vm-patched.txt" unit | wc -l) rows compared"
	fi
}

print_table() {
	local r n s d
	echo
	printf '%-42s %-5s %s\n' "CHECK" "RESULT" "DETAIL"
	printf '%-42s %-5s %s\n' "-----" "------" "------"
	for r in "${ROWS[@]}"; do
		IFS='|' read -r n s d <<<"$r"
		printf '%-42s %-6s %s\n' "$n" "$s" "$d"
	done
	echo
	echo "series: ${#PATCHES[@]} patches, key $KEY; $PKG $PKGVER; accel $ACCEL;" \
		"total $(($(date +%s) - T0)) s; logs in $LOGDIR"
	if [ ${#TAILS[@]} -gt 0 ]; then
		echo
		printf '%s\n' "${TAILS[@]}"
	fi
	if [ "$FAILS" -gt 0 ]; then
		echo "RESULT: FAIL ($FAILS failed)"
	else
		echo "RESULT: PASS"
	fi
}

main() {
	declare -gA VMSECS=()
	E2E=0 E2E_PLANNED=() BUNDLE_ROW=
	[ -n "${USWAP_E2E_DIR:-}${USWAP_E2E_CMD:-}${USWAP_E2E_CMDS:-}${USWAP_E2E_BUNDLE:-}" ] && E2E=1
	e2e_cmds
	mkdir -p "$CACHE/logs" "$CACHE/run"
	exec 9>"$CACHE/lock"
	flock -n 9 || die "another vm-test.sh holds $CACHE/lock"
	ensure_deps
	compute_keys
	# one directory per run, so a failure's logs survive the next run
	LOGDIR=$CACHE/logs/$KEY/$(date +%Y%m%d-%H%M%S)
	mkdir -p "$LOGDIR"
	prepare_src
	# From here on every failure is reported as a row of the table.
	set +e
	if build base && build patched; then
		probe_accel
		run_vm base
		run_vm patched
		evaluate_vm base
		evaluate_vm patched
		compare_unit
	fi
	print_table | tee "$LOGDIR/table.txt"
	[ "$FAILS" -eq 0 ]
}

main "$@"
