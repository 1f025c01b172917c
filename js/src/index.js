// corral-js: a Corral worker and client for Node.js (docs/javascript.md).

export { Client } from "./client.js";
export { CancelledError, Future, RemoteError } from "./future.js";
export { GraphError } from "./graph.js";
export { ProtocolError, REF_KEY, SerializationError, decodeMessage, decodePayload, encodeMessage, msgpackPayload } from "./codec.js";
export { CommClosedError, Connection, HandshakeError, PROTOCOL_VERSION, accept, answerChallenge, connect } from "./comm.js";
export { detectResources } from "./detect.js";
export { FrameDecoder, encodeFrames } from "./framing.js";
export { FunctionNotFound, FunctionRegistry } from "./registry.js";
export { ResourceError, ResourcePool, parseResources, validateDemand, validateOffer } from "./resources.js";
export { WorkerState } from "./state.js";
export { getTaskResources, taskEnv } from "./task-context.js";
export { TlsSettings } from "./tls.js";
export { RUNTIME, Worker } from "./worker.js";
