// Encodes every chosen and rejected text of an HH JSONL file with the `gpt-3-encoder` npm
// package's own JavaScript GPT-2 BPE encoder, one JSON array of ids per line (chosen, then
// rejected, row by row). Used by tools/prepare-test-assets.sh; the Rust test compares.
//
// usage: node gpt2_bpe_reference.js <node_modules dir> <input.jsonl> <output.jsonl>
const fs = require('fs');
const path = require('path');
const [modules, input, output] = process.argv.slice(2);
const { encode } = require(path.join(modules, 'gpt-3-encoder'));
const lines = fs.readFileSync(input, 'utf-8').split('\n').filter((l) => l.length > 0);
const out = [];
for (const line of lines) {
  const row = JSON.parse(line);
  out.push(JSON.stringify(encode(row.chosen)));
  out.push(JSON.stringify(encode(row.rejected)));
}
fs.writeFileSync(output, out.join('\n') + '\n');
console.log(`encoded ${out.length} texts from ${input}`);
