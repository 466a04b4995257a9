package main

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

const testPage = "kt-testbed http-echo test"

// startHTTPEcho serves httpEchoServer on a free loopback port and returns its address.
func startHTTPEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httpEchoServer(testPage)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// checkPage checks one plain HTTP answer: the page, X-Served-By and the protocol that arrived.
func checkPage(t *testing.T, client *http.Client, url, wantProto string) {
	t.Helper()
	resp, err := client.Post(url, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || string(body) != testPage+"\n" {
		t.Errorf("%s: %d %q, want 200 %q", url, resp.StatusCode, body, testPage+"\n")
	}
	if got := resp.Header.Get("X-Served-By"); got != testPage {
		t.Errorf("X-Served-By %q, want %q", got, testPage)
	}
	// Both ends must agree: what the client spoke and what the server saw.
	if resp.Proto != wantProto || resp.Header.Get("X-Proto") != wantProto {
		t.Errorf("proto %s, X-Proto %q, want %s", resp.Proto, resp.Header.Get("X-Proto"), wantProto)
	}
}

func TestHTTPEchoHTTP1(t *testing.T) {
	addr := startHTTPEcho(t)
	client := &http.Client{Timeout: 5 * time.Second}
	checkPage(t, client, "http://"+addr+"/any/path", "HTTP/1.1")
}

func TestHTTPEchoH2C(t *testing.T) {
	addr := startHTTPEcho(t)
	// x/net's transport rather than net/http's, so the server is checked against the same
	// HTTP/2 client code that many proxies use, not only against its own twin.
	tr := &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	checkPage(t, client, "http://"+addr+"/", "HTTP/2.0")
}

func TestHTTPEchoGRPCHealth(t *testing.T) {
	addr := startHTTPEcho(t)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var header metadata.MD
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&header))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health %v, want SERVING", resp.GetStatus())
	}
	if got := header.Get("x-served-by"); len(got) != 1 || got[0] != testPage {
		t.Errorf("x-served-by %q, want [%q]", got, testPage)
	}
}
