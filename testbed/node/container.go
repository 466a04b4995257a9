package node

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// containerRuntime is one container of a pod: its process tree (in a cgroup of its own under
// the pod's), its restarts and its log files.
type containerRuntime struct {
	rt    *podRuntime
	spec  *corev1.Container
	init  bool
	image *ResolvedImage

	mu           sync.Mutex
	pid          int
	running      bool
	startedAt    time.Time
	ready        bool
	started      bool // startup probe passed (or none)
	restarts     int32
	waitReason   string
	waitMessage  string
	current      *corev1.ContainerStateTerminated // set while not running after a run
	last         *corev1.ContainerStateTerminated
	exited       chan struct{} // closed when the current process ends
	env          map[string]string
	stopping     bool
	killedByHand bool // liveness failure: restart regardless of exit code
}

func newContainer(rt *podRuntime, spec *corev1.Container, init bool) *containerRuntime {
	return &containerRuntime{rt: rt, spec: spec, init: init}
}

func (c *containerRuntime) cgroup() string {
	return filepath.Join(c.rt.p.cfg.CgroupDir, "pods", string(c.rt.pod.UID), c.spec.Name)
}

func (c *containerRuntime) logDir() string {
	return filepath.Join(c.rt.dir, "logs", c.spec.Name)
}

func (c *containerRuntime) logFile(restart int32) string {
	return filepath.Join(c.logDir(), fmt.Sprintf("%d.log", restart))
}

func (c *containerRuntime) setWaiting(reason, msg string) {
	c.mu.Lock()
	c.waitReason, c.waitMessage = reason, msg
	c.mu.Unlock()
}

// argv applies Kubernetes' rules: command replaces the image's entrypoint, args its cmd, and
// $(VAR) refers to the container's environment.
func (c *containerRuntime) argv(env map[string]string) []string {
	var cmd []string
	switch {
	case len(c.spec.Command) > 0:
		cmd = append(cmd, c.spec.Command...)
		cmd = append(cmd, c.spec.Args...)
	case len(c.spec.Args) > 0:
		cmd = append(append(cmd, c.image.Entrypoint...), c.spec.Args...)
	default:
		cmd = append(append(cmd, c.image.Entrypoint...), c.image.Cmd...)
	}
	for i := range cmd {
		cmd[i] = expandVars(cmd[i], env)
	}
	return cmd
}

var varRef = regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)

func expandVars(s string, env map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		name := m[2 : len(m)-1]
		if v, ok := env[name]; ok {
			return v
		}
		return m
	})
}

// environment is the image's ENV, then the container's as the kubelet resolves it.
func (c *containerRuntime) environment() (map[string]string, error) {
	env := map[string]string{
		"PATH":     "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOSTNAME": c.rt.pod.Name,
		"HOME":     "/root",
	}
	for k, v := range c.image.Env {
		env[k] = v
	}
	resolved, err := c.rt.containerEnv(c.rt.ctx, c.spec)
	if err != nil {
		return nil, err
	}
	for k, v := range resolved {
		env[k] = v
	}
	return env, nil
}

func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// files are the per-container files: the pod's DNS and hosts, and the image's own.
func (c *containerRuntime) files() (map[string][]byte, error) {
	rt := c.rt
	files := map[string][]byte{}
	for dst, src := range c.image.Files {
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("image file %s: %w", src, err)
		}
		files[dst] = b
	}
	pod := rt.pod
	dnsPolicy := pod.Spec.DNSPolicy
	clusterDNS := dnsPolicy == corev1.DNSClusterFirst || dnsPolicy == "" || dnsPolicy == corev1.DNSClusterFirstWithHostNet
	if pod.Spec.HostNetwork && dnsPolicy != corev1.DNSClusterFirstWithHostNet {
		clusterDNS = false
	}
	var resolv bytes.Buffer
	if clusterDNS {
		d := rt.p.cfg.ClusterDomain
		fmt.Fprintf(&resolv, "search %s.svc.%s svc.%s %s\nnameserver %s\noptions ndots:5\n",
			pod.Namespace, d, d, d, rt.p.cfg.ClusterDNS)
	} else if dnsPolicy != corev1.DNSNone {
		b, _ := os.ReadFile("/etc/resolv.conf")
		resolv.Write(b)
	}
	if cfg := pod.Spec.DNSConfig; cfg != nil {
		for _, ns := range cfg.Nameservers {
			fmt.Fprintf(&resolv, "nameserver %s\n", ns)
		}
		if len(cfg.Searches) > 0 {
			fmt.Fprintf(&resolv, "search %s\n", strings.Join(cfg.Searches, " "))
		}
	}
	files["/etc/resolv.conf"] = resolv.Bytes()
	if !pod.Spec.HostNetwork {
		rt.mu.Lock()
		ip := rt.podIP
		rt.mu.Unlock()
		host := pod.Name
		if pod.Spec.Hostname != "" {
			host = pod.Spec.Hostname
		}
		hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", ip, host)
		for _, ha := range pod.Spec.HostAliases {
			hosts += ha.IP + "\t" + strings.Join(ha.Hostnames, " ") + "\n"
		}
		files["/etc/hosts"] = []byte(hosts)
		files["/etc/hostname"] = []byte(host + "\n")
	}
	return files, nil
}

func (c *containerRuntime) mounts() ([]Mount, error) {
	var out []Mount
	c.rt.mu.Lock()
	vols := c.rt.volumes
	c.rt.mu.Unlock()
	for _, vm := range c.spec.VolumeMounts {
		src, ok := vols[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %q refers to no volume of the pod", vm.Name)
		}
		if vm.SubPath != "" {
			src = filepath.Join(src, vm.SubPath)
		}
		out = append(out, Mount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly})
	}
	return out, nil
}

// start launches the container's process through pod-init.
func (c *containerRuntime) start() error {
	rt := c.rt
	env, err := c.environment()
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.env = env
	c.mu.Unlock()
	files, err := c.files()
	if err != nil {
		return err
	}
	mounts, err := c.mounts()
	if err != nil {
		return err
	}
	privileged, caps := c.capabilities()
	user, group, noNewPrivs, readOnlyRoot, err := c.identity()
	if err != nil {
		return err
	}
	wd := c.spec.WorkingDir
	if wd == "" {
		wd = c.image.WorkingDir
	}
	scratch := filepath.Join(rt.dir, "scratch", c.spec.Name)
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	rt.mu.Lock()
	netns := rt.netns
	rt.mu.Unlock()
	hostname := ""
	if !rt.hostNetwork() {
		hostname = rt.pod.Name
		if rt.pod.Spec.Hostname != "" {
			hostname = rt.pod.Spec.Hostname
		}
	}
	spec := InitSpec{
		NetNS: netns, Hostname: hostname, Scratch: scratch, HostMounts: rt.p.hostMounts,
		Files: files, Mounts: mounts, Args: c.argv(env), Env: envList(env), WorkingDir: wd,
		Privileged: privileged, Caps: caps,
		User: user, Group: group, NoNewPrivs: noNewPrivs, ReadOnlyRoot: readOnlyRoot,
	}
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.cgroup(), 0o755); err != nil {
		return fmt.Errorf("cgroup %s: %w", c.cgroup(), err)
	}
	cg, err := os.Open(c.cgroup())
	if err != nil {
		return err
	}
	defer cg.Close()
	if err := os.MkdirAll(c.logDir(), 0o755); err != nil {
		return err
	}
	c.mu.Lock()
	restart := c.restarts
	c.mu.Unlock()
	logf, err := os.OpenFile(c.logFile(restart), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	specR, specW, err := os.Pipe()
	if err != nil {
		logf.Close()
		return err
	}
	// pod-init holds builtW (fd 4, close-on-exec) until it execs the container's command: the
	// container counts as running only once its root and mounts are in place, so that no
	// `kubectl exec` enters it while it still sees the node's root.
	builtR, builtW, err := os.Pipe()
	if err != nil {
		specR.Close()
		specW.Close()
		logf.Close()
		return err
	}
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	cmd := exec.Command(rt.p.cfg.SelfExe, "pod-init")
	cmd.ExtraFiles = []*os.File{specR, builtW}
	cmd.Stdout, cmd.Stderr = outW, errW
	flags := uintptr(syscall.CLONE_NEWNS)
	if hostname != "" {
		flags |= syscall.CLONE_NEWUTS
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: flags, Setsid: true, UseCgroupFD: true, CgroupFD: int(cg.Fd()),
	}
	err = cmd.Start()
	specR.Close()
	builtW.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		specW.Close()
		builtR.Close()
		outR.Close()
		errR.Close()
		logf.Close()
		return fmt.Errorf("start: %w", err)
	}
	go func() {
		_, _ = specW.Write(specJSON)
		specW.Close()
	}()
	lw := &logWriter{f: logf}
	var copies sync.WaitGroup
	copies.Add(2)
	go func() { defer copies.Done(); lw.copy("stdout", outR) }()
	go func() { defer copies.Done(); lw.copy("stderr", errR) }()
	// EOF once pod-init has exec'd the command (or failed); bounded in case it hangs.
	_ = builtR.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, _ = io.Copy(io.Discard, builtR)
	builtR.Close()

	exited := make(chan struct{})
	c.mu.Lock()
	c.pid, c.running, c.startedAt, c.exited = cmd.Process.Pid, true, time.Now(), exited
	c.waitReason, c.waitMessage, c.current = "", "", nil
	c.ready = false
	c.started = c.spec.StartupProbe == nil
	c.killedByHand = false
	c.mu.Unlock()
	rt.event(corev1.EventTypeNormal, "Started", "Started container %s", c.spec.Name)

	go func() {
		err := cmd.Wait()
		copies.Wait()
		logf.Close()
		code, reason := int32(0), "Completed"
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int32(ws.Signal())
				} else {
					code = int32(ee.ExitCode())
				}
			} else {
				code = 128
			}
			reason = "Error"
			if code == 127 {
				reason = "StartError"
			}
		}
		c.mu.Lock()
		c.running, c.ready, c.pid = false, false, 0
		c.current = &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: metav1.NewTime(c.startedAt), FinishedAt: metav1.Now(),
			ContainerID: c.containerID(),
		}
		if code != 0 {
			c.current.Message = lw.tail()
		}
		c.mu.Unlock()
		close(exited)
		rt.changed()
	}()
	go c.probe(exited)
	rt.changed()
	return nil
}

// identity is the rest of the container's securityContext, the container's fields over the
// pod's: the user and group to run as, no_new_privs, a read-only root. Like the kubelet, it
// refuses to start a container that must not run as root but would (testbed images run as
// root unless runAsUser says otherwise).
func (c *containerRuntime) identity() (user, group *int64, noNewPrivs, readOnlyRoot bool, err error) {
	var nonRoot *bool
	if psc := c.rt.pod.Spec.SecurityContext; psc != nil {
		user, group, nonRoot = psc.RunAsUser, psc.RunAsGroup, psc.RunAsNonRoot
	}
	if sc := c.spec.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			user = sc.RunAsUser
		}
		if sc.RunAsGroup != nil {
			group = sc.RunAsGroup
		}
		if sc.RunAsNonRoot != nil {
			nonRoot = sc.RunAsNonRoot
		}
		noNewPrivs = sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
		readOnlyRoot = sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem
	}
	if nonRoot != nil && *nonRoot && (user == nil || *user == 0) {
		return nil, nil, false, false, fmt.Errorf("container has runAsNonRoot and image will run as root")
	}
	return user, group, noNewPrivs, readOnlyRoot, nil
}

// capabilities is the container's securityContext: privileged, or the bounding set.
func (c *containerRuntime) capabilities() (bool, []string) {
	var add, drop []string
	sc := c.spec.SecurityContext
	if sc == nil {
		return false, ContainerCaps(nil, nil)
	}
	if sc.Privileged != nil && *sc.Privileged {
		return true, nil
	}
	if sc.Capabilities != nil {
		for _, x := range sc.Capabilities.Add {
			add = append(add, string(x))
		}
		for _, x := range sc.Capabilities.Drop {
			drop = append(drop, string(x))
		}
	}
	return false, ContainerCaps(add, drop)
}

func (c *containerRuntime) containerID() string {
	return fmt.Sprintf("kt-testbed://%s/%s/%d", c.rt.pod.UID, c.spec.Name, c.restarts)
}

// shouldRestart applies the pod's restartPolicy to an exit code.
func (c *containerRuntime) shouldRestart(code int32) bool {
	switch c.rt.pod.Spec.RestartPolicy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return code != 0
	default:
		return !c.init || code != 0
	}
}

// backoff grows from 1 s to 10 s: Kubernetes' curve, shortened for a test cluster.
func backoff(restarts int32) time.Duration {
	d := time.Second << uint(min(restarts, 4))
	return min(d, 10*time.Second)
}

// supervise keeps a regular container running as its restartPolicy says.
func (c *containerRuntime) supervise() {
	for {
		if err := c.start(); err != nil {
			c.setWaiting("CreateContainerError", err.Error())
			c.rt.event(corev1.EventTypeWarning, "Failed", "Error: %v", err)
			c.rt.changed()
			select {
			case <-c.rt.ctx.Done():
				return
			case <-time.After(2 * time.Second):
			}
			continue
		}
		c.mu.Lock()
		exited := c.exited
		c.mu.Unlock()
		<-exited
		c.mu.Lock()
		code, stopping, forced := c.current.ExitCode, c.stopping, c.killedByHand
		c.mu.Unlock()
		if stopping || c.rt.ctx.Err() != nil || (!forced && !c.shouldRestart(code)) {
			return
		}
		c.mu.Lock()
		c.last = c.current
		c.restarts++
		wait := backoff(c.restarts - 1)
		c.waitReason = "CrashLoopBackOff"
		c.waitMessage = fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", wait, c.spec.Name, c.rt.pod.Name)
		c.mu.Unlock()
		c.rt.event(corev1.EventTypeWarning, "BackOff", "Back-off restarting failed container %s", c.spec.Name)
		c.rt.changed()
		select {
		case <-c.rt.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// runToCompletion runs an init container until it exits 0; false if the pod must give up or
// was deleted.
func (c *containerRuntime) runToCompletion() bool {
	for {
		if err := c.start(); err != nil {
			c.setWaiting("CreateContainerError", err.Error())
			c.rt.changed()
			return false
		}
		c.mu.Lock()
		exited := c.exited
		c.mu.Unlock()
		select {
		case <-exited:
		case <-c.rt.ctx.Done():
			return false
		}
		c.mu.Lock()
		code := c.current.ExitCode
		c.mu.Unlock()
		if code == 0 {
			return true
		}
		if !c.shouldRestart(code) {
			return false
		}
		c.mu.Lock()
		c.last = c.current
		c.restarts++
		wait := backoff(c.restarts - 1)
		c.mu.Unlock()
		select {
		case <-c.rt.ctx.Done():
			return false
		case <-time.After(wait):
		}
	}
}

// pids lists the processes in the container's cgroup.
func (c *containerRuntime) pids() []int {
	data, err := os.ReadFile(filepath.Join(c.cgroup(), "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// signalAll sends sig to every process of the container (all of them are ours: the cgroup
// holds only what pod-init and exec started).
func (c *containerRuntime) signalAll(sig syscall.Signal) {
	for _, pid := range c.pids() {
		_ = syscall.Kill(pid, sig)
	}
}

// stop ends the container: SIGTERM, then SIGKILL after grace; it waits until the cgroup is
// empty and removes it.
func (c *containerRuntime) stop(grace time.Duration) {
	c.mu.Lock()
	c.stopping = true
	exited := c.exited
	c.mu.Unlock()
	c.signalAll(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for len(c.pids()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	for i := 0; len(c.pids()) > 0; i++ {
		if err := os.WriteFile(filepath.Join(c.cgroup(), "cgroup.kill"), []byte("1"), 0o644); err != nil {
			c.signalAll(syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
		if i == 500 {
			c.rt.event(corev1.EventTypeWarning, "FailedKillPod", "processes of container %s survive SIGKILL: %v", c.spec.Name, c.pids())
			break
		}
	}
	if exited != nil {
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
	}
	_ = os.Remove(c.cgroup())
}

func (c *containerRuntime) cpuUsageNanos() uint64 {
	data, err := os.ReadFile(filepath.Join(c.cgroup(), "cpu.stat"))
	if err != nil {
		return 0
	}
	return parseUsage(data)
}

// status is the container's ContainerStatus; podWait is the pod-level reason shown while
// the sandbox is not ready yet.
func (c *containerRuntime) status(podWait, podMsg string, podGone bool) corev1.ContainerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := corev1.ContainerStatus{
		Name: c.spec.Name, Image: c.spec.Image, ImageID: "kt-testbed://" + NormaliseImage(c.spec.Image),
		RestartCount: c.restarts, Ready: c.ready && c.running,
	}
	started := c.running && c.started
	st.Started = &started
	if c.running || c.current != nil {
		st.ContainerID = c.containerID()
	}
	switch {
	case c.running && !podGone:
		st.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(c.startedAt)}
	case c.waitReason != "" && !podGone:
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waitReason, Message: c.waitMessage}
	case c.current != nil:
		t := *c.current
		st.State.Terminated = &t
	case podGone:
		st.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed", FinishedAt: metav1.Now()}
	default:
		reason := podWait
		if reason == "" {
			reason = "PodInitializing"
		}
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: podMsg}
	}
	if c.last != nil {
		st.LastTerminationState.Terminated = c.last.DeepCopy()
	}
	return st
}

// logWriter stores a container's output in the CRI log format:
// "<RFC3339Nano> <stream> <F|P> <text>".
type logWriter struct {
	mu   sync.Mutex
	f    *os.File
	last []string
}

func (w *logWriter) copy(stream string, r io.ReadCloser) {
	defer r.Close()
	br := bufio.NewReaderSize(r, 64*1024)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			tag := "F"
			text := line
			if line[len(line)-1] == '\n' {
				text = line[:len(line)-1]
			} else {
				tag = "P"
			}
			w.mu.Lock()
			fmt.Fprintf(w.f, "%s %s %s %s\n", time.Now().UTC().Format(time.RFC3339Nano), stream, tag, text)
			if stream == "stderr" || len(w.last) == 0 {
				w.last = append(w.last, string(text))
				if len(w.last) > 5 {
					w.last = w.last[1:]
				}
			}
			w.mu.Unlock()
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// tail is the end of the output, for a terminated container's message.
func (w *logWriter) tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.Join(w.last, "\n")
}
