package node

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// InitSpec is what the agent hands to `kt-node pod-init` (on fd 3) to start one container.
// pod-init runs in a fresh mount (and UTS) namespace made by clone(2); it joins the pod's
// network namespace, builds the container's root and execs the container's program.
type InitSpec struct {
	NetNS      string            `json:"netns,omitempty"` // /run/netns/<name>; empty: the node's
	Hostname   string            `json:"hostname,omitempty"`
	Scratch    string            `json:"scratch"` // folder that receives the tmpfs for the overlay
	HostMounts []string          `json:"hostMounts"`
	Files      map[string][]byte `json:"files"`
	Mounts     []Mount           `json:"mounts"`
	Args       []string          `json:"args"`
	Env        []string          `json:"env"`
	WorkingDir string            `json:"workingDir,omitempty"`
	Privileged bool              `json:"privileged"`
	Caps       []string          `json:"caps"` // the bounding set when not privileged
	// securityContext: the user and group to run as (nil: root), no_new_privs, and a
	// read-only root filesystem (volumes keep their own mode).
	User         *int64 `json:"user,omitempty"`
	Group        *int64 `json:"group,omitempty"`
	NoNewPrivs   bool   `json:"noNewPrivs,omitempty"`
	ReadOnlyRoot bool   `json:"readOnlyRoot,omitempty"`
}

// Mount is one bind mount into the container's root.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly"`
}

// PodInitMain is `kt-node pod-init`. It must run on the main OS thread (see LockMainThread),
// because setns(CLONE_NEWNET) changes only the calling thread and execve keeps that thread's
// namespaces.
func PodInitMain() {
	f := os.NewFile(3, "spec")
	var spec InitSpec
	if err := json.NewDecoder(f).Decode(&spec); err != nil {
		fail("reading the container spec: %v", err)
	}
	f.Close()
	// fd 4 tells the node when the container is built: it closes when the command is exec'd.
	syscall.CloseOnExec(4)
	if err := buildContainer(&spec); err != nil {
		fail("%v", err)
	}
	path := spec.Args[0]
	if !strings.Contains(path, "/") {
		for _, e := range spec.Env {
			if strings.HasPrefix(e, "PATH=") {
				os.Setenv("PATH", e[5:])
			}
		}
		p, err := exec.LookPath(path)
		if err != nil {
			fail("executable %q not found in the container's PATH: %v", path, err)
		}
		path = p
	}
	err := syscall.Exec(path, spec.Args, spec.Env)
	fail("exec %s: %v", path, err)
}

// LockMainThread pins the main goroutine to the main thread; call it from init().
func LockMainThread() { runtime.LockOSThread() }

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kt-node pod-init: "+format+"\n", args...)
	os.Exit(127)
}

func buildContainer(spec *InitSpec) error {
	if len(spec.Args) == 0 {
		return fmt.Errorf("no command: the image table gives none and the pod spec sets neither command nor args")
	}
	if spec.NetNS != "" {
		fd, err := unix.Open(spec.NetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", spec.NetNS, err)
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns %s: %w", spec.NetNS, err)
		}
		unix.Close(fd)
	}
	// Nothing mounted from here on may reach the node's mount namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make / a slave mount: %w", err)
	}
	// The container's root: a writable overlay over the machine's root filesystem, its upper
	// layer on a tmpfs that lives as long as this mount namespace does.
	if err := unix.Mount("kt-scratch", spec.Scratch, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs on %s: %w", spec.Scratch, err)
	}
	upper, work, root := filepath.Join(spec.Scratch, "upper"), filepath.Join(spec.Scratch, "work"), filepath.Join(spec.Scratch, "root")
	for _, d := range []string{upper, work, root} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=/,upperdir=%s,workdir=%s", upper, work)
	if err := unix.Mount("overlay", root, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay root (%s): %w", opts, err)
	}
	// Paths inside the root resolve its symlinks against the root (/var/run -> /run), never
	// against the machine's own tree.
	inRoot := func(p string) (string, error) {
		dst, err := securejoin.SecureJoin(root, p)
		if err != nil {
			return "", fmt.Errorf("path %s in the container: %w", p, err)
		}
		return dst, nil
	}
	if err := unix.Mount("proc", filepath.Join(root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount proc: %w", err)
	}
	for _, m := range append([]string{"/sys", "/dev"}, spec.HostMounts...) {
		dst, err := inRoot(m)
		if err != nil {
			return err
		}
		if err := bind(m, dst, false, true); err != nil {
			return err
		}
	}
	for p, content := range spec.Files {
		dst, err := inRoot(p)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		_ = os.Remove(dst) // a symlink (resolv.conf often is one) must not be followed out
		if err := os.WriteFile(dst, content, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	for _, m := range spec.Mounts {
		dst, err := inRoot(m.Target)
		if err != nil {
			return err
		}
		if err := bind(m.Source, dst, m.ReadOnly, true); err != nil {
			return err
		}
	}
	if err := os.Chdir(root); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	wd := spec.WorkingDir
	if wd == "" {
		wd = "/"
	}
	if err := os.MkdirAll(wd, 0o755); err != nil {
		return err
	}
	if err := os.Chdir(wd); err != nil {
		return err
	}
	if spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	if !spec.Privileged {
		if err := limitCaps(spec.Caps); err != nil {
			return err
		}
	}
	if spec.ReadOnlyRoot {
		if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("read-only root filesystem: %w", err)
		}
	}
	if spec.NoNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	// Last: once the user is not root, the capabilities above are gone.
	if spec.Group != nil || spec.User != nil {
		gid := 0
		if spec.Group != nil {
			gid = int(*spec.Group)
		}
		if err := unix.Setgroups([]int{}); err != nil {
			return fmt.Errorf("setgroups: %w", err)
		}
		if err := unix.Setgid(gid); err != nil {
			return fmt.Errorf("setgid %d: %w", gid, err)
		}
	}
	if spec.User != nil {
		if err := unix.Setuid(int(*spec.User)); err != nil {
			return fmt.Errorf("setuid %d: %w", *spec.User, err)
		}
	}
	return nil
}

// bind mounts src on dst, making dst (a folder or a file, like src) inside the overlay first.
func bind(src, dst string, readOnly, recursive bool) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("mount source %s: %w", src, err)
	}
	if st.IsDir() {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
	} else {
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	flags := uintptr(unix.MS_BIND)
	if recursive {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(src, dst, "", flags, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", src, dst, err)
	}
	if readOnly {
		if err := unix.Mount("", dst, "", flags|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("read-only %s: %w", dst, err)
		}
	}
	return nil
}

// capNames maps the names Kubernetes uses (without CAP_) to capability numbers.
var capNames = map[string]int{
	"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
	"SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
	"NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
	"SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
	"SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
	"SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
	"SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
	"BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

// DefaultCaps is the set a container runtime grants when the pod asks for nothing more.
var DefaultCaps = []string{"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
	"SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}

// limitCaps drops every capability outside keep from the bounding set; as the process stays
// uid 0, execve then gives it exactly the bounding set.
func limitCaps(keep []string) error {
	allowed := map[int]bool{}
	for _, name := range keep {
		n, ok := capNames[strings.TrimPrefix(strings.ToUpper(name), "CAP_")]
		if !ok {
			return fmt.Errorf("unknown capability %q", name)
		}
		allowed[n] = true
	}
	for c := 0; c <= 40; c++ {
		if allowed[c] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	return nil
}

// ContainerCaps computes the bounding set for a container's securityContext.
func ContainerCaps(add, drop []string) []string {
	set := map[string]bool{}
	for _, c := range DefaultCaps {
		set[c] = true
	}
	norm := func(s string) string { return strings.TrimPrefix(strings.ToUpper(s), "CAP_") }
	for _, c := range drop {
		if norm(c) == "ALL" {
			set = map[string]bool{}
			continue
		}
		delete(set, norm(c))
	}
	for _, c := range add {
		if norm(c) == "ALL" {
			for n := range capNames {
				set[n] = true
			}
			continue
		}
		set[norm(c)] = true
	}
	out := make([]string, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	return out
}
