// The chat page: streams replies from /v1/chat/completions (server-sent events) as they come.
"use strict";
const messages = [];
let model = null, controller = null;
const log = document.getElementById("log");

async function loadModel() {
  const reply = await layerswarm.fetch("/v1/models");
  const data = await reply.json();
  model = data.data[0].id;
  document.getElementById("model").textContent = model;
}

function bubble(role, text) {
  const div = layerswarm.el("div", "msg " + role, text);
  log.append(div);
  div.scrollIntoView();
  return div;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.done = "0";
  controller = new AbortController();
  document.getElementById("stop").disabled = false;
  document.getElementById("send").disabled = true;
  let reply = "";
  try {
    const response = await layerswarm.fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true,
        temperature: Number(document.getElementById("temperature").value) }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) { reply += delta.content; out.textContent = reply; }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", "error: " + e.message);
  } finally {
    messages.push({ role: "assistant", content: reply });
    out.dataset.done = "1";
    controller = null;
    document.getElementById("stop").disabled = true;
    document.getElementById("send").disabled = false;
  }
}

document.getElementById("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const box = document.getElementById("prompt"), text = box.value.trim();
  if (text && !controller) { box.value = ""; send(text); }
});
document.getElementById("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    document.getElementById("ask").requestSubmit();
  }
});
document.getElementById("stop").addEventListener("click", () => controller && controller.abort());
loadModel().catch((e) => bubble("error", "cannot reach the API: " + e.message));
