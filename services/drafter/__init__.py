"""The drafter service: a thin gRPC servicer over the library's in-process head drafter."""
