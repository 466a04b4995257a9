package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// podRuntime is one pod on this node: its network, volumes and containers.
type podRuntime struct {
	p   *Provider
	dir string // <state>/pods/<uid>

	// pubMu orders status publications: see changed.
	pubMu sync.Mutex

	mu          sync.Mutex
	pod         *corev1.Pod
	startTime   time.Time
	podIP       string
	netns       string // /run/netns/<name>, empty for hostNetwork
	volumes     map[string]string
	netReady    bool
	initialized bool
	failed      bool // restartPolicy forbids another try
	terminating bool
	terminated  bool
	waitReason  string // pod-level reason while not started (shown on every container)
	waitMessage string

	initCtrs []*containerRuntime
	ctrs     []*containerRuntime
	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{}
}

func newPodRuntime(p *Provider, pod *corev1.Pod) *podRuntime {
	ctx, cancel := context.WithCancel(context.Background())
	rt := &podRuntime{
		p: p, pod: pod, dir: filepath.Join(p.cfg.StateDir, "pods", string(pod.UID)),
		startTime: time.Now(), ctx: ctx, cancel: cancel, done: make(chan struct{}),
		waitReason: "ContainerCreating",
	}
	for i := range pod.Spec.InitContainers {
		rt.initCtrs = append(rt.initCtrs, newContainer(rt, &pod.Spec.InitContainers[i], true))
	}
	for i := range pod.Spec.Containers {
		rt.ctrs = append(rt.ctrs, newContainer(rt, &pod.Spec.Containers[i], false))
	}
	return rt
}

func (rt *podRuntime) event(kind, reason, format string, args ...any) {
	if rt.p.cfg.Recorder != nil {
		rt.p.cfg.Recorder.Eventf(rt.pod, kind, reason, format, args...)
	}
}

func (rt *podRuntime) hostNetwork() bool { return rt.pod.Spec.HostNetwork }

// changed publishes the current status to the API server. The snapshot is taken and handed
// over under one lock, so publications arrive in the order their snapshots were taken: the
// pod's runner and its probes publish from different goroutines, and an older snapshot
// delivered last (say, "started, not ready" after "ready") would stay the pod's status in the
// API for good, as nothing changes afterwards to correct it.
func (rt *podRuntime) changed() {
	rt.pubMu.Lock()
	defer rt.pubMu.Unlock()
	rt.p.publish(rt.snapshot())
}

// run drives the pod from creation to running; it returns when the pod is running or failed
// (containers then supervise themselves) or when the pod is deleted.
func (rt *podRuntime) run() {
	defer close(rt.done)
	rt.changed()
	// Images first: an unknown one fails the pod's containers at once, as a failed pull does.
	for _, c := range append(append([]*containerRuntime{}, rt.initCtrs...), rt.ctrs...) {
		rt.event(corev1.EventTypeNormal, "Pulling", "Pulling image %q", c.spec.Image)
		img, err := rt.p.cfg.Images.Resolve(c.spec.Image)
		if err != nil {
			c.setWaiting("ErrImagePull", err.Error())
			rt.event(corev1.EventTypeWarning, "Failed", "Failed to pull image %q: %v", c.spec.Image, err)
			rt.event(corev1.EventTypeWarning, "Failed", "Error: ErrImagePull")
			rt.mu.Lock()
			rt.waitReason, rt.waitMessage = "", ""
			rt.mu.Unlock()
			rt.changed()
			return
		}
		c.image = img
		rt.event(corev1.EventTypeNormal, "Pulled", "Container image %q already present on machine", c.spec.Image)
	}
	if err := os.MkdirAll(rt.dir, 0o755); err != nil {
		rt.setWaiting("CreateContainerError", err.Error())
		return
	}
	if !rt.retry("FailedCreatePodSandBox", rt.setupNetwork) {
		return
	}
	if !rt.retry("FailedMount", rt.setupVolumes) {
		return
	}
	rt.mu.Lock()
	rt.waitReason, rt.waitMessage = "", ""
	rt.mu.Unlock()
	for _, c := range rt.initCtrs {
		if !c.runToCompletion() {
			rt.mu.Lock()
			rt.failed = rt.pod.Spec.RestartPolicy == corev1.RestartPolicyNever
			rt.mu.Unlock()
			rt.changed()
			return
		}
	}
	rt.mu.Lock()
	rt.initialized = true
	rt.mu.Unlock()
	for _, c := range rt.ctrs {
		go c.supervise()
	}
	rt.changed()
}

// retry runs step until it works or the pod is deleted, reporting each new error once.
func (rt *podRuntime) retry(reason string, step func() error) bool {
	last := ""
	for {
		err := step()
		if err == nil {
			return true
		}
		if err.Error() != last {
			last = err.Error()
			rt.event(corev1.EventTypeWarning, reason, "%v", err)
			rt.setWaiting("ContainerCreating", err.Error())
		}
		select {
		case <-rt.ctx.Done():
			return false
		case <-time.After(time.Second):
		}
	}
}

func (rt *podRuntime) setWaiting(reason, msg string) {
	rt.mu.Lock()
	rt.waitReason, rt.waitMessage = reason, msg
	rt.mu.Unlock()
	rt.changed()
}

func (rt *podRuntime) setupNetwork() error {
	if rt.hostNetwork() {
		rt.mu.Lock()
		rt.podIP, rt.netReady = rt.p.cfg.NodeIP, true
		rt.mu.Unlock()
		return nil
	}
	ip, netns, err := rt.p.net.Setup(podKey(rt.pod.Namespace, rt.pod.Name), string(rt.pod.UID))
	if err != nil {
		return err
	}
	if sc := rt.pod.Spec.SecurityContext; sc != nil && len(sc.Sysctls) > 0 {
		if err := applySysctls(netns, sc.Sysctls); err != nil {
			_ = rt.p.net.Teardown(string(rt.pod.UID), ip.String())
			return err
		}
	}
	rt.mu.Lock()
	rt.podIP, rt.netns, rt.netReady = ip.String(), "/run/netns/"+netns, true
	rt.pod.Status.PodIP = rt.podIP // the downward API reads it
	rt.mu.Unlock()
	rt.changed()
	return nil
}

func (rt *podRuntime) setupVolumes() error {
	rt.mu.Lock()
	pod := rt.pod.DeepCopy()
	pod.Status.HostIP = rt.p.cfg.NodeIP
	rt.mu.Unlock()
	vols, err := materialiseVolumes(rt.ctx, rt.p.cfg.Client, pod, filepath.Join(rt.dir, "volumes"), ownRoots{cgroup: rt.p.cfg.CgroupDir, bpf: rt.p.cfg.BpfDir})
	if err != nil {
		return err
	}
	rt.mu.Lock()
	rt.volumes = vols
	rt.mu.Unlock()
	return nil
}

// terminate stops every container and frees the pod's namespaces and files.
func (rt *podRuntime) terminate(ctx context.Context) {
	rt.mu.Lock()
	if rt.terminated {
		rt.mu.Unlock()
		return
	}
	rt.terminating = true
	rt.mu.Unlock()
	rt.cancel()
	<-rt.done
	grace := int64(30)
	if g := rt.pod.Spec.TerminationGracePeriodSeconds; g != nil {
		grace = *g
	}
	if rt.pod.DeletionGracePeriodSeconds != nil && *rt.pod.DeletionGracePeriodSeconds < grace {
		grace = *rt.pod.DeletionGracePeriodSeconds
	}
	var wg sync.WaitGroup
	for _, c := range append(append([]*containerRuntime{}, rt.initCtrs...), rt.ctrs...) {
		wg.Add(1)
		go func(c *containerRuntime) {
			defer wg.Done()
			c.stop(time.Duration(grace) * time.Second)
		}(c)
	}
	wg.Wait()
	rt.mu.Lock()
	ip, hostNet := rt.podIP, rt.hostNetwork()
	rt.mu.Unlock()
	if !hostNet && ip != "" {
		if err := rt.p.net.Teardown(string(rt.pod.UID), ip); err != nil {
			rt.event(corev1.EventTypeWarning, "FailedKillPod", "network teardown: %v", err)
		}
	}
	_ = os.RemoveAll(filepath.Join(rt.p.cfg.CgroupDir, "pods", string(rt.pod.UID)))
	_ = os.RemoveAll(rt.dir)
	rt.mu.Lock()
	rt.terminated = true
	rt.mu.Unlock()
	rt.changed()
}

func (rt *podRuntime) find(name string) *containerRuntime {
	all := append(append([]*containerRuntime{}, rt.ctrs...), rt.initCtrs...)
	if name == "" && len(rt.ctrs) > 0 {
		return rt.ctrs[0]
	}
	for _, c := range all {
		if c.spec.Name == name {
			return c
		}
	}
	return nil
}

func (rt *podRuntime) cpuUsageNanos() uint64 {
	data, err := os.ReadFile(filepath.Join(rt.p.cfg.CgroupDir, "pods", string(rt.pod.UID), "cpu.stat"))
	if err != nil {
		// Without controllers the pod folder has no cpu.stat; sum the containers'.
		var sum uint64
		for _, c := range rt.ctrs {
			sum += c.cpuUsageNanos()
		}
		return sum
	}
	return parseUsage(data)
}

func parseUsage(data []byte) uint64 {
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "usage_usec" {
			v, _ := strconv.ParseUint(f[1], 10, 64)
			return v * 1000
		}
	}
	return 0
}

// snapshot is the pod as the API server should see it.
func (rt *podRuntime) snapshot() *corev1.Pod {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	pod := rt.pod.DeepCopy()
	st := &pod.Status
	st.HostIP = rt.p.cfg.NodeIP
	st.HostIPs = []corev1.HostIP{{IP: rt.p.cfg.NodeIP}}
	if rt.podIP != "" {
		st.PodIP = rt.podIP
		st.PodIPs = []corev1.PodIP{{IP: rt.podIP}}
	}
	start := metav1.NewTime(rt.startTime)
	st.StartTime = &start
	// The API server set the QoS class when it admitted the pod (Guaranteed when requests
	// equal limits), and it is immutable: keep it.
	if st.QOSClass == "" {
		st.QOSClass = corev1.PodQOSBestEffort
	}

	st.InitContainerStatuses = nil
	for _, c := range rt.initCtrs {
		st.InitContainerStatuses = append(st.InitContainerStatuses, c.status(rt.waitReason, rt.waitMessage, rt.terminated))
	}
	st.ContainerStatuses = nil
	allReady, anyRunning, allDone, anyFailed := true, false, true, false
	for _, c := range rt.ctrs {
		cs := c.status(rt.waitReason, rt.waitMessage, rt.terminated || (!rt.initialized && rt.failed))
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			allReady = false
		}
		if cs.State.Running != nil {
			anyRunning = true
		}
		if cs.State.Terminated == nil {
			allDone = false
		} else if cs.State.Terminated.ExitCode != 0 {
			anyFailed = true
		}
	}
	policy := pod.Spec.RestartPolicy
	switch {
	case rt.failed:
		st.Phase = corev1.PodFailed
	case rt.terminated && anyFailed:
		st.Phase = corev1.PodFailed
	case rt.terminated:
		st.Phase = corev1.PodSucceeded
	case allDone && len(rt.ctrs) > 0 && policy == corev1.RestartPolicyNever && anyFailed:
		st.Phase = corev1.PodFailed
	case allDone && len(rt.ctrs) > 0 && policy != corev1.RestartPolicyAlways && !anyFailed:
		st.Phase = corev1.PodSucceeded
	case anyRunning || (rt.initialized && !allDone):
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: start}
	}
	ready := allReady && anyRunning && !rt.terminating && !rt.terminated
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, rt.netReady && !rt.terminated),
		cond(corev1.PodInitialized, rt.initialized),
		cond(corev1.ContainersReady, ready),
		cond(corev1.PodReady, ready),
		cond(corev1.PodScheduled, true),
	}
	if rt.failed {
		st.Reason, st.Message = "Failed", fmt.Sprintf("pod failed and restartPolicy is %s", policy)
	}
	return pod
}
