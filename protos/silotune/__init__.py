"""Generated protobuf code (protoc via grpcio-tools); regenerate with `make protos`."""
