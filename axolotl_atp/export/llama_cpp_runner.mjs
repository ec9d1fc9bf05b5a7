// Runs a GGUF file in llama.cpp through node-llama-cpp (v3), for axolotl_atp/export/llama_cpp.py.
//
// Usage: node llama_cpp_runner.mjs NODE_LLAMA_CPP_PACKAGE_DIR REQUEST.json
// REQUEST: {model, vocab_size, threads, kv_cache_f32, sequences: [[token ids]], texts: [str], generate: {prompt: [ids], tokens: n}}
// Writes beside REQUEST.json:
//   logits-<i>.f32   raw next-token logits of sequence i, [positions x vocab_size] float32 little-endian
//   result.json      {llama_cpp_release, tokenized: [[ids]] (llama.cpp's own tokenizer, no BOS),
//                     generation: {tokens, seconds, tokens_per_second}}
// Token ids are fed as they are: llama.cpp adds no BOS here.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const { getLlama, LlamaLogLevel } = await import(pathToFileURL(path.join(process.argv[2], "dist", "index.js")).href);
const requestPath = process.argv[3];
const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));
const outDir = path.dirname(requestPath);

const llama = await getLlama({
  gpu: false,
  build: "never",
  skipDownload: true,
  progressLogs: false,
  logLevel: LlamaLogLevel.error,
});
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const threads = request.threads ?? 0;
const result = { llama_cpp_release: llama.llamaCppRelease, tokenized: [], generation: null };

const longest = Math.max(16, ...request.sequences.map((s) => s.length), (request.generate?.prompt?.length ?? 0) + (request.generate?.tokens ?? 0));
// The check keeps the KV cache in f32 and flash attention off: the defaults (f16 cache, flash attention on CPU
// in f16) alone move probabilities by ~1e-3.
const kvType = request.kv_cache_f32 ? "F32" : "F16";
const context = await model.createContext({
  // Room to spare: near a full context node-llama-cpp shifts it (re-evaluating tokens), which ruins speed figures.
  contextSize: 2 * longest + 64,
  batchSize: longest + 8,
  threads,
  sequences: 1,
  experimentalKvCacheKeyType: kvType,
  experimentalKvCacheValueType: kvType,
  flashAttention: request.kv_cache_f32 ? false : "auto",
});
const sequence = context.getSequence();

for (const [i, ids] of request.sequences.entries()) {
  await sequence.clearHistory();
  const input = ids.map((token) => [token, { generateNext: { logits: true } }]);
  const outputs = await sequence.controlledEvaluate(input);
  const logits = new Float32Array(ids.length * request.vocab_size).fill(Number.NaN);
  for (let position = 0; position < ids.length; position++) {
    const next = outputs[position]?.next?.logits;
    if (next == null) throw new Error(`llama.cpp returned no logits for sequence ${i} position ${position}`);
    for (const [token, value] of next) logits[position * request.vocab_size + token] = value;
  }
  fs.writeFileSync(path.join(outDir, `logits-${i}.f32`), Buffer.from(logits.buffer));
}

for (const text of request.texts ?? []) result.tokenized.push(Array.from(model.tokenize(text, false)));

if (request.generate) {
  await sequence.clearHistory();
  const { prompt, tokens } = request.generate;
  let count = 0;
  let started = null;
  // Greedy decoding; the clock starts at the first generated token, so prompt processing is not counted.
  for await (const token of sequence.evaluate(prompt, { temperature: 0 })) {
    if (started === null) started = process.hrtime.bigint();
    count += 1;
    if (count >= tokens + 1) break;
    void token;
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  result.generation = { tokens: count - 1, seconds, tokens_per_second: (count - 1) / seconds };
}

fs.writeFileSync(path.join(outDir, "result.json"), JSON.stringify(result));
await context.dispose();
await model.dispose();
await llama.dispose();
