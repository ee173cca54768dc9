"""The test bed: a real control plane (etcd, kube-apiserver, controller-manager, scheduler) with KWOK GPU
nodes, SeaweedFS S3 and Prometheus, all on loopback. See docs/testing.md."""
