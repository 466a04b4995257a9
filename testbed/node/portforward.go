package node

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/mux"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	"k8s.io/apimachinery/pkg/util/httpstream/wsstream"
	"k8s.io/apiserver/pkg/endpoints/responsewriter"
)

// PortForwardHandler serves the kubelet API's /portForward/{namespace}/{pod}.
//
// virtual-kubelet v1.14.1 hands its websocket path an empty port list, so websocket clients
// (kube-rs; any client the API server passes the websocket protocol through for) got no
// channels at all. Websocket requests are served here, with the ports from the query as the
// kubelet does; SPDY requests go to virtual-kubelet's handler.
func PortForwardHandler(p *Provider, idle time.Duration) http.Handler {
	spdy := api.HandlePortForward(p.PortForward, api.WithPortForwardStreamIdleTimeout(idle))
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
		if len(parts) < 3 {
			http.Error(w, "expected /portForward/{namespace}/{pod}", http.StatusBadRequest)
			return
		}
		ns, pod := parts[1], parts[2]
		if !wsstream.IsWebSocketRequest(req) {
			spdy.ServeHTTP(w, mux.SetURLVars(req, map[string]string{"namespace": ns, "pod": pod}))
			return
		}
		var ports []int32
		for _, v := range req.URL.Query()["port"] {
			for _, s := range strings.Split(v, ",") {
				n, err := strconv.ParseUint(s, 10, 16)
				if err != nil || n == 0 {
					http.Error(w, fmt.Sprintf("bad port %q", s), http.StatusBadRequest)
					return
				}
				ports = append(ports, int32(n))
			}
		}
		if len(ports) == 0 {
			http.Error(w, "query parameter \"port\" is required", http.StatusBadRequest)
			return
		}
		channels := make([]wsstream.ChannelType, 0, 2*len(ports))
		for range ports {
			channels = append(channels, wsstream.ReadWriteChannel, wsstream.WriteChannel)
		}
		conn := wsstream.NewConn(map[string]wsstream.ChannelProtocolConfig{
			"": {Binary: true, Channels: channels},
			"v4." + wsstream.ChannelWebSocketProtocol:       {Binary: true, Channels: channels},
			"v4." + wsstream.Base64ChannelWebSocketProtocol: {Binary: false, Channels: channels},
		})
		conn.SetIdleTimeout(idle)
		_, streams, err := conn.Open(responsewriter.GetOriginal(w), req)
		if err != nil {
			return
		}
		defer conn.Close()
		var wg sync.WaitGroup
		for i, port := range ports {
			data, errs := streams[2*i], streams[2*i+1]
			prefix := make([]byte, 2)
			binary.LittleEndian.PutUint16(prefix, uint16(port))
			_, _ = data.Write(prefix)
			_, _ = errs.Write(prefix)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer data.Close()
				defer errs.Close()
				if err := p.PortForward(context.Background(), ns, pod, port, data); err != nil {
					_, _ = fmt.Fprint(errs, err.Error())
				}
			}()
		}
		wg.Wait()
	})
}
