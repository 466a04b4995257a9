package node

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the container's startup, readiness and liveness probes until the process exits.
// Without a readiness probe the container is ready once started, as the kubelet does it.
func (c *containerRuntime) probe(exited <-chan struct{}) {
	spec := c.spec
	if spec.StartupProbe != nil {
		if !c.loop(exited, spec.StartupProbe, "Startup", func(ok bool, _ string) bool {
			if ok {
				c.mu.Lock()
				c.started = true
				c.mu.Unlock()
				c.rt.changed()
			}
			return !ok
		}) {
			return
		}
	}
	if spec.ReadinessProbe == nil {
		c.mu.Lock()
		c.ready = c.running
		c.mu.Unlock()
		c.rt.changed()
	} else {
		go c.loop(exited, spec.ReadinessProbe, "Readiness", func(ok bool, _ string) bool {
			c.mu.Lock()
			was := c.ready
			c.ready = ok && c.running
			c.mu.Unlock()
			if was != ok {
				c.rt.changed()
			}
			return true
		})
	}
	if spec.LivenessProbe != nil {
		c.loop(exited, spec.LivenessProbe, "Liveness", func(ok bool, msg string) bool {
			if ok {
				return true
			}
			c.rt.event(corev1.EventTypeNormal, "Killing", "Container %s failed liveness probe, will be restarted", spec.Name)
			c.mu.Lock()
			c.killedByHand = true
			c.mu.Unlock()
			c.signalAll(syscall.SIGKILL)
			return false
		})
	}
}

// loop runs one probe on its period; report receives each verdict after the thresholds and
// returns whether to go on. loop returns false if the container exited first.
func (c *containerRuntime) loop(exited <-chan struct{}, p *corev1.Probe, kind string, report func(bool, string) bool) bool {
	period := time.Duration(max(p.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	success, failure := max(p.SuccessThreshold, 1), max(p.FailureThreshold, 1)
	select {
	case <-exited:
		return false
	case <-time.After(time.Duration(p.InitialDelaySeconds) * time.Second):
	}
	var okRun, failRun int32
	for {
		err := c.runProbe(p, timeout)
		if err == nil {
			okRun, failRun = okRun+1, 0
			if okRun >= success && !report(true, "") {
				return true
			}
		} else {
			okRun, failRun = 0, failRun+1
			c.rt.event(corev1.EventTypeWarning, "Unhealthy", "%s probe failed: %v", kind, err)
			if failRun >= failure && !report(false, err.Error()) {
				return true
			}
		}
		select {
		case <-exited:
			return false
		case <-c.rt.ctx.Done():
			return false
		case <-time.After(period):
		}
	}
}

func (c *containerRuntime) port(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("container has no port named %q", p.StrVal)
}

func (c *containerRuntime) runProbe(p *corev1.Probe, timeout time.Duration) error {
	c.rt.mu.Lock()
	ip := c.rt.podIP
	c.rt.mu.Unlock()
	switch {
	case p.Exec != nil:
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd, err := c.command(ctx, p.Exec.Command)
		if err != nil {
			return err
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	case p.HTTPGet != nil:
		port, err := c.port(p.HTTPGet.Port)
		if err != nil {
			return err
		}
		host := ip
		if p.HTTPGet.Host != "" {
			host = p.HTTPGet.Host
		}
		scheme := strings.ToLower(string(p.HTTPGet.Scheme))
		if scheme == "" {
			scheme = "http"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), p.HTTPGet.Path)
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		for _, h := range p.HTTPGet.HTTPHeaders {
			req.Header.Add(h.Name, h.Value)
		}
		client := &http.Client{Timeout: timeout, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true,
		}}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe failed with statuscode: %d", resp.StatusCode)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := c.port(p.TCPSocket.Port)
		if err != nil {
			return err
		}
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), timeout)
		if err != nil {
			return err
		}
		return conn.Close()
	case p.GRPC != nil:
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(int(p.GRPC.Port))), timeout)
		if err != nil {
			return err
		}
		return conn.Close()
	}
	return fmt.Errorf("probe has no handler")
}
