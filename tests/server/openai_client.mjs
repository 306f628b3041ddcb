// The npm `openai` client against sae-server's /v1/chat/completions: with and without the
// `steering` extension, streamed and not. Greedy: the streamed text must equal the non-streamed
// one, steering must change it, and the unsteered text must begin as the Python driver saw it.
//   node openai_client.mjs BASE_URL EXPECTED_PREFIX   (NODE_PATH: where `openai` is installed)
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const OpenAI = require("openai");

const [baseURL, expectedPrefix] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "none", maxRetries: 0, timeout: 60000 });
const hook = "blocks.2.hook_resid_pre";
const base = {
  model: "stories260K",
  messages: [{ role: "user", content: "Once upon a time" }],
  max_tokens: 30,
  temperature: 0,
};
const steering = [{ hook, feature: 3, op: "clamp", value: 20 }];

async function plain(extra) {
  const r = await client.chat.completions.create({ ...base, ...extra });
  if (r.object !== "chat.completion" || r.choices[0].message.role !== "assistant")
    throw new Error("not a chat.completion: " + JSON.stringify(r));
  return r.choices[0].message.content;
}

async function streamed(extra) {
  const s = await client.chat.completions.create({ ...base, ...extra, stream: true });
  let text = "", finish = null, chunks = 0;
  for await (const c of s) {
    chunks++;
    text += c.choices[0]?.delta?.content ?? "";
    finish = c.choices[0]?.finish_reason ?? finish;
  }
  if (finish !== "length" || chunks < 3) throw new Error(`stream ended badly: ${finish}, ${chunks}`);
  return text;
}

let failures = 0;
function check(cond, what) {
  if (!cond) { failures++; console.log("FAIL: " + what); }
}

const a = await plain({});
const b = await streamed({});
const c = await plain({ steering });
const d = await streamed({ steering });
check(a.startsWith(expectedPrefix), `unsteered text ${JSON.stringify(a)}`);
check(a === b, `streamed = non-streamed, unsteered: ${JSON.stringify(b)}`);
check(c === d, `streamed = non-streamed, steered: ${JSON.stringify(c)} vs ${JSON.stringify(d)}`);
check(a !== c, "steering changes the text");
try {
  await client.chat.completions.create({ ...base, steering: [{ hook, feature: 99999, op: "clamp", value: 1 }] });
  check(false, "an out-of-range feature was accepted");
} catch (e) {
  check(e.status === 400 && /out of range/.test(e.message), `a 400 for a bad feature: ${e.status} ${e.message}`);
}
console.log(`openai (npm ${JSON.parse(fs.readFileSync(path.join(process.env.NODE_PATH || ".", "openai", "package.json"))).version}): unsteered ${JSON.stringify(a.slice(0, 40))}..., ` +
            `steered ${JSON.stringify(c.slice(0, 40))}..., ${failures} failure(s)`);
process.exit(failures ? 1 : 0);
