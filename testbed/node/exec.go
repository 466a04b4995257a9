package node

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	utilexec "k8s.io/utils/exec"
)

// RunInContainer serves `kubectl exec`: the command runs in the container's namespaces and
// root (nsenter on its main process), in its cgroup, with its environment.
func (p *Provider) RunInContainer(ctx context.Context, ns, name, container string, cmd []string, attach api.AttachIO) error {
	c, err := p.container(ns, name, container)
	if err != nil {
		return err
	}
	proc, err := c.command(ctx, cmd)
	if err != nil {
		return err
	}
	if attach.TTY() {
		return runTTY(proc, attach)
	}
	var stdin io.WriteCloser
	if attach.Stdin() != nil {
		if stdin, err = proc.StdinPipe(); err != nil {
			return err
		}
	}
	if w := attach.Stdout(); w != nil {
		proc.Stdout = w
	}
	if w := attach.Stderr(); w != nil {
		proc.Stderr = w
	}
	if err := proc.Start(); err != nil {
		return fmt.Errorf("exec in %s/%s: %w", name, container, err)
	}
	if stdin != nil {
		go func() {
			_, _ = io.Copy(stdin, attach.Stdin())
			stdin.Close()
		}()
	}
	return exitError(proc.Wait())
}

// command builds the nsenter command line for an exec or an exec probe.
func (c *containerRuntime) command(ctx context.Context, cmd []string) (*exec.Cmd, error) {
	c.mu.Lock()
	pid, running, env := c.pid, c.running, c.env
	c.mu.Unlock()
	if !running || pid == 0 {
		return nil, errdefs.InvalidInput(fmt.Sprintf("container %q is not running", c.spec.Name))
	}
	if len(cmd) == 0 {
		return nil, errdefs.InvalidInput("no command given")
	}
	args := []string{"--target", strconv.Itoa(pid), "--mount", "--net", "--root", "--wd"}
	if !c.rt.hostNetwork() {
		args = append(args, "--uts")
	}
	args = append(args, "--")
	// An exec'd process gets the container's capabilities, as the kubelet gives it, not the
	// agent's: setpriv (util-linux, in every container's root here) narrows the bounding set.
	if privileged, caps := c.capabilities(); !privileged {
		set := "-all"
		for _, cp := range caps {
			set += ",+" + strings.ToLower(cp)
		}
		args = append(args, "setpriv", "--bounding-set", set, "--")
	}
	args = append(args, cmd...)
	proc := exec.CommandContext(ctx, "nsenter", args...)
	proc.Env = envList(env)
	cg, err := os.Open(c.cgroup())
	if err != nil {
		return nil, err
	}
	// The descriptor must outlive Start; it is closed when the process is reaped.
	proc.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	proc.Cancel = func() error { cg.Close(); return proc.Process.Kill() }
	go func() {
		<-ctx.Done()
		cg.Close()
	}()
	return proc, nil
}

func runTTY(proc *exec.Cmd, attach api.AttachIO) error {
	f, err := pty.Start(proc)
	if err != nil {
		return err
	}
	defer f.Close()
	go func() {
		for size := range attach.Resize() {
			_ = pty.Setsize(f, &pty.Winsize{Rows: size.Height, Cols: size.Width})
		}
	}()
	if in := attach.Stdin(); in != nil {
		go func() { _, _ = io.Copy(f, in) }()
	}
	if out := attach.Stdout(); out != nil {
		go func() { _, _ = io.Copy(out, f) }()
	}
	return exitError(proc.Wait())
}

func exitError(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return utilexec.CodeExitError{Err: err, Code: ee.ExitCode()}
	}
	return err
}

// PortForward serves `kubectl port-forward`: a TCP connection from the node to the pod.
func (p *Provider) PortForward(ctx context.Context, ns, name string, port int32, stream io.ReadWriteCloser) error {
	rt := p.lookup(ns, name)
	if rt == nil {
		return errdefs.NotFoundf("pod %s/%s is not on this node", ns, name)
	}
	rt.mu.Lock()
	ip := rt.podIP
	rt.mu.Unlock()
	if ip == "" {
		return errdefs.InvalidInput(fmt.Sprintf("pod %s/%s has no IP yet", ns, name))
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	conn, err := d.DialContext(dctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(int(port))))
	cancel()
	if err != nil {
		return fmt.Errorf("port-forward to %s/%s port %d: %w", ns, name, port, err)
	}
	defer conn.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = io.Copy(conn, stream)
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	_, _ = io.Copy(stream, conn)
	stream.Close()
	wg.Wait()
	return nil
}

// logLine is one parsed line of a CRI log file.
type logLine struct {
	ts     time.Time
	stream string
	full   bool
	text   []byte
}

func parseLogLine(b []byte) (logLine, bool) {
	parts := bytes.SplitN(b, []byte(" "), 4)
	if len(parts) < 4 {
		return logLine{}, false
	}
	ts, err := time.Parse(time.RFC3339Nano, string(parts[0]))
	if err != nil {
		return logLine{}, false
	}
	return logLine{ts: ts, stream: string(parts[1]), full: string(parts[2]) == "F", text: parts[3]}, true
}

func (l logLine) render(timestamps bool) []byte {
	var b bytes.Buffer
	if timestamps {
		b.WriteString(l.ts.Format(time.RFC3339Nano))
		b.WriteByte(' ')
	}
	b.Write(l.text)
	if l.full {
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// logs serves `kubectl logs` with --tail, --since, --timestamps, --previous, --limit-bytes and
// -f (which ends when the container does).
func (c *containerRuntime) logs(ctx context.Context, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	c.mu.Lock()
	restart, running, exited := c.restarts, c.running, c.exited
	c.mu.Unlock()
	if !running && !opts.Previous && restart > 0 {
		// Between restarts (back-off) the latest output is the last run's, as with the kubelet.
		if _, err := os.Stat(c.logFile(restart)); err != nil {
			restart--
		}
	}
	if opts.Previous {
		if restart == 0 {
			return nil, errdefs.InvalidInput(fmt.Sprintf("previous terminated container %q not found", c.spec.Name))
		}
		restart--
		running = false
	}
	f, err := os.Open(c.logFile(restart))
	if err != nil {
		if os.IsNotExist(err) {
			return nil, errdefs.InvalidInput(fmt.Sprintf("container %q has not started yet", c.spec.Name))
		}
		return nil, err
	}
	since := opts.SinceTime
	if opts.SinceSeconds > 0 {
		since = time.Now().Add(-time.Duration(opts.SinceSeconds) * time.Second)
	}
	var lines [][]byte
	br := bufio.NewReader(f)
	var partial []byte
	for {
		b, err := br.ReadBytes('\n')
		if err != nil {
			partial = b
			break
		}
		if l, ok := parseLogLine(bytes.TrimSuffix(b, []byte("\n"))); ok && !l.ts.Before(since) {
			lines = append(lines, l.render(opts.Timestamps))
		}
	}
	// virtual-kubelet cannot tell tailLines=0 from no tailLines; both mean everything here.
	if opts.Tail > 0 && len(lines) > opts.Tail {
		lines = lines[len(lines)-opts.Tail:]
	}
	pr, pw := io.Pipe()
	go func() {
		defer f.Close()
		written := 0
		write := func(b []byte) bool {
			if opts.LimitBytes > 0 && written+len(b) > opts.LimitBytes {
				b = b[:opts.LimitBytes-written]
			}
			n, err := pw.Write(b)
			written += n
			return err == nil && (opts.LimitBytes == 0 || written < opts.LimitBytes)
		}
		for _, l := range lines {
			if !write(l) {
				pw.Close()
				return
			}
		}
		if !opts.Follow || !running {
			pw.Close()
			return
		}
		buf := partial
		for {
			b, err := br.ReadBytes('\n')
			buf = append(buf, b...)
			if err == nil {
				if l, ok := parseLogLine(bytes.TrimSuffix(buf, []byte("\n"))); ok {
					if !write(l.render(opts.Timestamps)) {
						pw.Close()
						return
					}
				}
				buf = nil
				continue
			}
			select {
			case <-ctx.Done():
				pw.Close()
				return
			case <-exited:
				// Drain what the process wrote last, then end.
				rest, _ := io.ReadAll(br)
				for _, line := range strings.Split(string(append(buf, rest...)), "\n") {
					if l, ok := parseLogLine([]byte(line)); ok {
						write(l.render(opts.Timestamps))
					}
				}
				pw.Close()
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return pr, nil
}
