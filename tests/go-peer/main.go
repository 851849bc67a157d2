// go-peer: the bench's Go peer, a TLS-terminating HTTP/2 reverse proxy on
// Go's standard library only (net/http, net/http/httputil, crypto/tls), the
// stack hoop's gateway, Teleport's Kubernetes proxy and kube-oidc-proxy are
// built on. It forwards every request unchanged (the client's bearer token
// included) to one upstream over TLS verified against its CA, HTTP/2 when
// the upstream offers it, and flushes streamed responses (watches) at once.
//
// Built by the bench's set-up (`go build`, no modules to download); prints
// "go-peer listening on https://ADDR" on standard error when it accepts.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	cert := flag.String("cert", "", "serving certificate (PEM)")
	key := flag.String("key", "", "serving key (PEM)")
	upstream := flag.String("upstream", "", "https://host:port of the API server")
	upstreamCA := flag.String("upstream-ca", "", "CA bundle the upstream's certificate chains to")
	serverName := flag.String("upstream-server-name", "kubernetes.default.svc", "name the upstream's certificate is checked for")
	flag.Parse()
	if *cert == "" || *key == "" || *upstream == "" || *upstreamCA == "" {
		fmt.Fprintln(os.Stderr, "go-peer: --cert, --key, --upstream and --upstream-ca are required")
		os.Exit(2)
	}
	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatalf("go-peer: --upstream %q: %v", *upstream, err)
	}
	caPEM, err := os.ReadFile(*upstreamCA)
	if err != nil {
		log.Fatalf("go-peer: --upstream-ca: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		log.Fatalf("go-peer: no certificate in %s", *upstreamCA)
	}
	transport := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: roots, ServerName: *serverName},
		ForceAttemptHTTP2:   true,
		MaxIdleConns:        100,
		MaxIdleConnsPerHost: 100,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = transport
	// Watches and logs stream: write each chunk as it arrives.
	proxy.FlushInterval = -1
	proxy.ErrorLog = log.New(os.Stderr, "go-peer: ", log.LstdFlags)

	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		log.Fatalf("go-peer: serving certificate: %v", err)
	}
	server := &http.Server{
		Handler:           proxy,
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{pair},
			MinVersion:   tls.VersionTLS12,
			NextProtos:   []string{"h2", "http/1.1"},
		},
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("go-peer: listen %s: %v", *listen, err)
	}
	fmt.Fprintf(os.Stderr, "go-peer listening on https://%s\n", listener.Addr())
	log.Fatal(server.ServeTLS(listener, "", ""))
}
