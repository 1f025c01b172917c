// corral-js: a Corral worker and client for Node.js (docs/javascript.md).

export { CancelledError, Client, Future, RemoteError } from "./client.js";
export { ProtocolError, REF_KEY, SerializationError, decodeMessage, decodePayload, encodeMessage, msgpackPayload } from "./codec.js";
export { CommClosedError, Connection, HandshakeError, PROTOCOL_VERSION, accept, answerChallenge, connect } from "./comm.js";
export { FrameDecoder, encodeFrames } from "./framing.js";
export { FunctionNotFound, FunctionRegistry } from "./registry.js";
export { ResourcePool, parseResources } from "./resources.js";
export { WorkerState } from "./state.js";
export { RUNTIME, Worker } from "./worker.js";
