// What both pages share: the API key (asked once, kept in this browser) and fetch with it.
"use strict";
const layerswarm = {
  key() { return localStorage.getItem("layerswarm-api-key") || ""; },
  headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = layerswarm.key();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  },
  async fetch(url, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = layerswarm.headers(opts.headers);
    let reply = await fetch(url, opts);
    if (reply.status === 401) {
      const key = prompt("This swarm-api needs its API key:");
      if (key !== null) {
        localStorage.setItem("layerswarm-api-key", key.trim());
        opts.headers = layerswarm.headers(options && options.headers);
        reply = await fetch(url, opts);
      }
    }
    return reply;
  },
  bytes(n) {
    if (!n) return "?";
    if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(1) + " GiB";
    return (n / 2 ** 20).toFixed(0) + " MiB";
  },
  text(el, value) { el.textContent = value; return el; },
  el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  },
};
