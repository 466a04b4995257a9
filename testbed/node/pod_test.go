package node

import (
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Regression: a pod started by the runner goroutine ("running, not ready") and marked ready
// by its probe goroutine could have the older status delivered last, and stayed not Ready in
// the API (seen as "timed out waiting for a new nginx pod Ready" in the e2e tests).
func TestAStatusTakenLaterIsNeverOvertakenByAnOlderOne(t *testing.T) {
	p := &Provider{pods: map[string]*podRuntime{}}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default", UID: "uid-1"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "nginx", Image: "nginx"}}},
	}
	rt := newPodRuntime(p, pod)
	c := rt.ctrs[0]
	c.mu.Lock()
	c.running, c.started = true, true
	c.mu.Unlock()

	// The first delivery is slow (as virtual-kubelet's can be: it may wait for its pod cache);
	// the delivered status is recorded when a delivery ends.
	var mu sync.Mutex
	var deliveries int
	var last *corev1.Pod
	firstEntered := make(chan struct{})
	p.notify = func(pod *corev1.Pod) {
		mu.Lock()
		deliveries++
		first := deliveries == 1
		mu.Unlock()
		if first {
			close(firstEntered)
			time.Sleep(200 * time.Millisecond)
		}
		mu.Lock()
		last = pod
		mu.Unlock()
	}

	runnerDone := make(chan struct{})
	go func() {
		rt.changed() // "running, not ready"
		close(runnerDone)
	}()
	<-firstEntered
	c.mu.Lock()
	c.ready = true
	c.mu.Unlock()
	rt.changed() // the probe: "ready"
	<-runnerDone

	mu.Lock()
	defer mu.Unlock()
	if deliveries != 2 {
		t.Fatalf("expected 2 deliveries, got %d", deliveries)
	}
	if !podReady(last) {
		t.Fatalf("the last status delivered is not Ready: %+v", last.Status.Conditions)
	}
}
