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
#        - optional uswap end-to-end tests (USWAP_E2E_DIR / USWAP_E2E_CMD)
#   5. prints a pass/fail table; exit status 0 only if every row passed.
#      A test that could not run counts as a failure.
#
# Environment:
#   USWAP_KERNEL_CACHE  cache dir (default ${XDG_CACHE_HOME:-/var/cache}/uswap-kernel)
#   USWAP_VM_ACCEL      auto (default) | tcg | kvm
#   USWAP_E2E_DIR       dir of static binaries: each is copied into the patched
#                       VM and run as one row (cwd /e2e, must exit 0)
#   USWAP_E2E_CMD       a shell command run in the patched VM (cwd /e2e)
#   USWAP_E2E_REQUIRED  1: it is a failure if no e2e test was given
#   USWAP_VM_TIMEOUT    seconds per VM run (default 900; each test inside: 400)
#   JOBS                make -j (default: nproc)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${USWAP_KERNEL_CACHE:-${XDG_CACHE_HOME:-/var/cache}/uswap-kernel}
JOBS=${JOBS:-$(nproc)}
ACCEL=${USWAP_VM_ACCEL:-auto}
VM_TIMEOUT=${USWAP_VM_TIMEOUT:-900}
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

log() { echo "[vm-test $(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 2; }
# row NAME STATUS DETAIL: STATUS is PASS, FAIL or INFO (INFO is not counted)
row() {
	ROWS+=("$1|$2|$3")
	[ "$2" = FAIL ] && FAILS=$((FAILS + 1))
	return 0
}

# Kernel configuration: tinyconfig plus what the VM and the tests need.
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
	echo qemu-system-x86_64 -accel "$accel" "${cpu[@]}" -m 2G \
		-smp cpus=2,sockets=2 -nographic -no-reboot -kernel "$kernel" \
		-initrd "$initrd" \
		-append "'console=ttyS0 panic=-1 quiet brd.rd_nr=1 brd.rd_size=65536'"
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

write_init() {
	cat >"$1/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo 64 >/proc/sys/vm/nr_hugepages
# 64 MiB of swap on a RAM disk, for the swapped-out-page test
mkswap /dev/ram0 >/dev/null 2>&1 && swapon /dev/ram0
echo "@@KERNEL $(uname -r) hugepages=$(cat /proc/sys/vm/nr_hugepages) swap_kB=$(awk '/SwapTotal/ {print $2}' /proc/meminfo)"
run() {
	name=$1; shift
	echo "@@BEGIN $name"
	s=$(date +%s)
	timeout 400 "$@" </dev/null 2>&1
	rc=$?
	echo "@@END $name rc=$rc secs=$(($(date +%s) - s))"
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

# run_vm VARIANT: boot the kernel of VARIANT with all tests, log to $LOGDIR
run_vm() {
	local variant=$1 d t1 s
	d=$CACHE/run/$variant
	rm -rf "$d" "$d.cpio.gz"
	mkdir -p "$d"/{bin,proc,sys,dev,tmp,t/base,t/patched,e2e}
	cp "$BUSYBOX" "$d/bin/busybox"
	cp "$CACHE"/bin-base/* "$d/t/base/"
	cp "$CACHE/bin-patched/uffd-unit-tests" "$d/t/patched/"
	write_init "$d"
	{
		echo "cd /t"
		echo "run unit base/uffd-unit-tests"
		for s in "${STRESS[@]}"; do
			echo "run 'stress ${s%% *}' base/uffd-stress $s"
		done
		echo "run new patched/uffd-unit-tests -f move-cross-mm"
	} >"$d/plan"
	if [ "$variant" = patched ] && [ "$E2E" = 1 ]; then
		if [ -n "${USWAP_E2E_DIR:-}" ]; then
			cp -a "$USWAP_E2E_DIR"/. "$d/e2e/"
			for s in "$USWAP_E2E_DIR"/*; do
				[ -f "$s" ] && [ -x "$s" ] || continue
				echo "cd /e2e; run 'e2e $(basename "$s")' ./$(basename "$s")"
			done >>"$d/plan"
		fi
		if [ -n "${USWAP_E2E_CMD:-}" ]; then
			printf "cd /e2e; run 'e2e cmd' sh -c %q\n" "$USWAP_E2E_CMD" >>"$d/plan"
		fi
	fi
	pack_initrd "$d"
	t1=$(date +%s)
	log "booting $variant kernel ($ACCEL), log: $LOGDIR/vm-$variant.log"
	eval "timeout $VM_TIMEOUT $(qemu_cmd "$CACHE/build-$variant/arch/x86/boot/bzImage" \
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
			for name in $(grep -a '^@@BEGIN e2e ' "$log" | cut -d' ' -f3-); do
				rc=$(end_rc "$log" "e2e $name")
				if [ "$rc" = 0 ]; then
					row "patched: e2e $name" PASS "$(end_secs "$log" "e2e $name") s"
				else
					row "patched: e2e $name" FAIL "rc=${rc:-none}"
				fi
			done
			grep -aq '^@@BEGIN e2e ' "$log" ||
				row "patched: uswap e2e" FAIL "USWAP_E2E_DIR had no executables"
		elif [ "${USWAP_E2E_REQUIRED:-0}" = 1 ]; then
			row "patched: uswap e2e" FAIL "not run: set USWAP_E2E_DIR or USWAP_E2E_CMD (the uswap backend tests do not exist yet)"
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
	if [ "$FAILS" -gt 0 ]; then
		echo "RESULT: FAIL ($FAILS failed)"
	else
		echo "RESULT: PASS"
	fi
}

main() {
	declare -gA VMSECS=()
	E2E=0
	[ -n "${USWAP_E2E_DIR:-}${USWAP_E2E_CMD:-}" ] && E2E=1
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
