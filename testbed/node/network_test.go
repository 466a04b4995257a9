package node

import "testing"

// A freed address comes back only after the others: the node's conntrack still holds the old
// pod's flows, which a new pod with its address would clash with.
func TestAddressesAreHandedOutRoundRobin(t *testing.T) {
	p, err := NewPodNetwork("10.244.9.0/29") // .2 to .6
	if err != nil {
		t.Fatal(err)
	}
	next := func(key string) string {
		t.Helper()
		ip, err := p.allocate(key)
		if err != nil {
			t.Fatalf("allocate %s: %v", key, err)
		}
		return ip.String()
	}
	var got []string
	got = append(got, next("a"), next("b"))
	p.release("10.244.9.2")
	got = append(got, next("c"), next("d"), next("e"), next("f"))
	want := []string{"10.244.9.2", "10.244.9.3", "10.244.9.4", "10.244.9.5", "10.244.9.6", "10.244.9.2"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("allocated %v, want %v", got, want)
		}
	}
	if ip, err := p.allocate("g"); err == nil {
		t.Fatalf("allocated %s from a full CIDR", ip)
	}
	p.release("10.244.9.4")
	if ip := next("h"); ip != "10.244.9.4" {
		t.Fatalf("the only free address is .4, got %s", ip)
	}
}
