module chaperone.dev/bench/go-peer

go 1.21
