// dgport's step loop in JavaScript: the public surface (Node.js and browsers alike).
export { PCG64 } from "./pcg64.js";
export { temperature, acceptMask, StableAndConfident, padAfterEos, meanF32, pairwiseSum } from "./sampler.js";
export { Row, generateIds, checkContext, DgportError, ENCODE_CHUNK } from "./loop.js";
export { Layout, layout, hole, TemplateError } from "./template.js";
export { readManifest, verifyFile, checkSettings, ExportError } from "./manifest.js";
export { OrtBackend, sessionOptions } from "./backend.js";
export { ChatTokenizer } from "./tokenizer.js";
export { Generator, freshSeed } from "./generator.js";
export * as sudoku from "./sudoku.js";
