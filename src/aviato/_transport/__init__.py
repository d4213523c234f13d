"""How the SDK reaches a service: the `Transport` interface (`base`), its gRPC implementation
(`grpc`), an in-memory one for tests (`memory`), and the one mapping of service errors to
`aviato.exceptions` (`errors`)."""
