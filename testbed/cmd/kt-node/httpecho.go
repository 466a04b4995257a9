package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// httpEcho is the kt-testbed/http-echo image: one port that answers HTTP/1.1, HTTP/2 with prior
// knowledge (h2c) and gRPC, so the mesh's header router can be checked on all three at once.
func httpEcho(args []string) {
	fs := flag.NewFlagSet("http-echo", flag.ExitOnError)
	port := fs.Int("port", 9090, "TCP port")
	page := fs.String("page", "kt-testbed http-echo", "the body of every answer, and its X-Served-By header")
	_ = fs.Parse(args)
	srv := httpEchoServer(*page)
	srv.Addr = ":" + strconv.Itoa(*port)
	fmt.Printf("http-echo listening on :%d\n", *port)
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintf(os.Stderr, "http-echo: %v\n", err)
		os.Exit(1)
	}
}

// httpEchoServer serves page on every path and method; Addr is left to the caller.
func httpEchoServer(page string) *http.Server {
	grpcServer := grpc.NewServer(grpc.UnaryInterceptor(servedBy(page)))
	// NewServer already says SERVING for ""; said again because the tests rely on it.
	healthServer := health.NewServer()
	healthServer.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(grpcServer, healthServer)

	// net/http speaks unencrypted HTTP/2 itself since Go 1.24 (x/net's h2c is deprecated):
	// a connection that opens with the HTTP/2 preface is h2c, any other is HTTP/1.1.
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// gRPC needs HTTP/2's trailers, so only an HTTP/2 request can be a gRPC call.
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			grpcServer.ServeHTTP(w, r)
			return
		}
		w.Header().Set("X-Served-By", page)
		// Tells a test which protocol reached the server (HTTP/2.0 or HTTP/1.1), the router in
		// between may change it.
		w.Header().Set("X-Proto", r.Proto)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = fmt.Fprintln(w, page)
	})
	return &http.Server{Handler: handler, Protocols: protocols}
}

// servedBy names the server in every gRPC answer's headers, as X-Served-By does for plain HTTP.
func servedBy(page string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
		if err := grpc.SetHeader(ctx, metadata.Pairs("x-served-by", page)); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}
