// headrace's built-in chat page: plain JavaScript, no build step, no network beyond this
// server. Model output is only ever inserted as text (textContent / createTextNode), never
// parsed as HTML: a reply containing "<img onerror=...>" shows those characters.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "headrace.chats";
const SETTINGS = "headrace.settings";
const KEY = "headrace.apiKey"; // sessionStorage: the key does not outlive the tab

let chats = load(STORE, []);
let current = null; // the conversation shown
let controller = null; // the AbortController of the request streaming now

function load(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(chats));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind || ""}`;
}

// ------------------------------------------------------------------ rendering

// Text with ``` fenced code blocks and `inline code`; everything goes in as text nodes.
function renderContent(el, text) {
  el.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      // The fence's first line names the language: drop it from the code.
      const nl = part.indexOf("\n");
      code.textContent = nl >= 0 && /^[\w+-]*$/.test(part.slice(0, nl)) ? part.slice(nl + 1) : part;
      pre.append(code);
      el.append(pre);
      return;
    }
    part.split("`").forEach((piece, j) => {
      if (j % 2 === 1) {
        const code = document.createElement("code");
        code.textContent = piece;
        el.append(code);
      } else {
        el.append(document.createTextNode(piece)); // line breaks: CSS white-space: pre-wrap
      }
    });
  });
}

function messageElement(role, content, done = true, stopped = false) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (done) div.dataset.done = "1"; // a reply still streaming has no data-done
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = stopped ? `${role} · stopped` : role;
  const body = document.createElement("div");
  body.className = "content";
  renderContent(body, content);
  div.append(label, body);
  return div;
}

function showChat() {
  const box = $("messages");
  box.replaceChildren(...(current ? current.messages.map((m) => messageElement(m.role, m.content, true, m.stopped)) : []));
  box.scrollTop = box.scrollHeight;
  const list = $("chats");
  list.replaceChildren();
  for (const chat of [...chats].sort((a, b) => b.updated - a.updated)) {
    const li = document.createElement("li");
    if (chat === current) li.className = "active";
    const title = document.createElement("span");
    title.textContent = chat.title || "New chat";
    title.addEventListener("click", () => {
      current = chat;
      showChat();
    });
    const del = document.createElement("button");
    del.type = "button";
    del.title = "Delete";
    del.textContent = "×";
    del.addEventListener("click", () => {
      chats = chats.filter((c) => c !== chat);
      if (current === chat) current = chats[0] || null;
      save();
      showChat();
    });
    li.append(title, del);
    list.append(li);
  }
}

function newChat() {
  current = { id: Date.now().toString(36), title: "", messages: [], updated: Date.now() };
  chats.push(current);
  showChat();
}

// ------------------------------------------------------------------ server

async function loadModels() {
  let res;
  try {
    res = await fetch("/v1/models", { headers: headers() });
  } catch {
    setStatus("server unreachable", "bad");
    setTimeout(loadModels, 2000);
    return;
  }
  if (res.status === 401) {
    askForKey();
    return;
  }
  const body = await res.json().catch(() => ({}));
  const models = (body.data || []).map((m) => m.id);
  if (!res.ok || models.length === 0) {
    setStatus(res.status === 503 || res.ok ? "server starting…" : `error ${res.status}`, "bad");
    setTimeout(loadModels, 2000); // workers still loading: /v1/models lists them once ready
    return;
  }
  const select = $("model");
  const chosen = load(SETTINGS, {}).model;
  select.replaceChildren(
    ...models.map((id) => {
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      return opt;
    }),
  );
  if (models.includes(chosen)) select.value = chosen;
  setStatus("ready", "ok");
}

function askForKey() {
  setStatus("API key needed", "bad");
  $("key-form").hidden = false;
  $("api-key").focus();
}

// Reads an SSE body: calls onData with each `data:` payload as it arrives.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of current.messages) {
    if (m.role === "user" || m.role === "assistant") messages.push({ role: m.role, content: m.content });
  }
  const body = { model: $("model").value, messages, stream: true };
  const t = parseFloat($("temperature").value);
  if (Number.isFinite(t)) body.temperature = t;
  const n = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(n) && n > 0) body.max_tokens = n;
  return body;
}

async function send(text) {
  if (!current) newChat();
  const chat = current;
  chat.messages.push({ role: "user", content: text });
  if (!chat.title) chat.title = text.slice(0, 40);
  chat.updated = Date.now();
  save();
  showChat();
  const reply = { role: "assistant", content: "" };
  const el = messageElement("assistant", "", false);
  $("messages").append(el);
  const body = el.querySelector(".content");
  controller = new AbortController();
  setBusy(true);
  let pending = false;
  let unauthorized = false;
  const redraw = () => {
    pending = false;
    renderContent(body, reply.content);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (res.status === 401) {
      unauthorized = true;
      el.remove();
      chat.messages.pop();
      save();
      showChat();
      askForKey();
      return;
    }
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${res.status}`);
    }
    await readEvents(res, (data) => {
      if (data === "[DONE]") return;
      const ev = JSON.parse(data);
      if (ev.error) throw new Error(ev.error.message);
      const delta = ev.choices?.[0]?.delta?.content;
      if (delta) {
        reply.content += delta;
        if (!pending) {
          pending = true;
          requestAnimationFrame(redraw);
        }
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stopped = true;
      el.querySelector(".role").textContent = "assistant · stopped";
    } else {
      el.className = "msg error";
      reply.content += (reply.content ? "\n" : "") + `[error: ${e.message}]`;
    }
  } finally {
    controller = null;
    setBusy(false);
    if (!unauthorized) {
      redraw();
      el.dataset.done = "1";
      chat.messages.push(reply);
      chat.updated = Date.now();
      save();
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ------------------------------------------------------------------ wiring

function init() {
  const s = load(SETTINGS, {});
  if (s.system !== undefined) $("system").value = s.system;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.maxTokens !== undefined) $("max-tokens").value = s.maxTokens;
  const keep = () =>
    localStorage.setItem(
      SETTINGS,
      JSON.stringify({
        model: $("model").value,
        system: $("system").value,
        temperature: $("temperature").value,
        maxTokens: $("max-tokens").value,
      }),
    );
  for (const id of ["model", "system", "temperature", "max-tokens"]) $(id).addEventListener("change", keep);

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // Aborting the fetch closes the connection; the server aborts the request and frees its
  // KV blocks at once.
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value);
    $("key-form").hidden = true;
    loadModels();
  });
  current = [...chats].sort((a, b) => b.updated - a.updated)[0] || null;
  showChat();
  loadModels();
}

init();
