"""The two network services over the specdec library: the gRPC drafter and the HTTP verifier."""
