// scae graph view: an attribution graph written by `attribute` (circuit-tracer's format),
// laid out by ELK's layered algorithm (vendor/elk.bundled.js) with one partition per graph
// layer: tokens at the bottom, each module's layer above the one before, logits on top. Link
// width is |weight| (blue adds, red subtracts); a feature node opens its page in the feature
// browser. Data: data/graphs.js (the list) and data/graph-<slug>.js (one graph). No network.
(function () {
  "use strict";
  var S = window.SCAE;
  var view = document.getElementById("view");
  var NS = "http://www.w3.org/2000/svg";
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(x) { return x === null || x === undefined ? "n/a" : Number(x).toPrecision(4); }
  function clear(kind) { view.textContent = ""; view.setAttribute("data-view", kind); }

  function renderList() {
    clear("graphs");
    view.appendChild(el("h2", {}, "Attribution graphs"));
    var list = S.graphs || [];
    if (!list.length) {
      view.appendChild(el("p", {}, "No graphs in this browser: write them with `attribute --out DIR` and " +
        "rebuild the browser with `view-features ... --graphs DIR` (or `make circuit PROMPT=...`)."));
      return;
    }
    var ul = el("ul", { id: "graph-list" });
    list.forEach(function (g) {
      var li = el("li");
      li.appendChild(el("a", { href: "#" + g.slug }, g.slug));
      li.appendChild(document.createTextNode(" — " + g.prompt));
      ul.appendChild(li);
    });
    view.appendChild(ul);
  }

  // Partition (row) of a node: tokens 0, graph layer L at L + 1, logits above every layer.
  function row(n, top) {
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return top;
    return parseInt(n.layer, 10) + 1;
  }
  function label(n, tokens) {
    if (n.feature_type === "embedding") return tokens[n.ctx_idx];
    if (n.feature_type === "logit") return n.clerp.replace(/^Output /, "");
    return n.module + "/" + n.index + "@" + n.ctx_idx;
  }
  function tooltip(n, tokens) {
    var lines = [n.node_id + " (" + n.feature_type + ") at position " + n.ctx_idx + " \"" + tokens[n.ctx_idx] + "\""];
    if (n.feature_type === "cross layer transcoder") {
      lines.push("activation " + fmt(n.activation) + ", pre-activation " + fmt(n.pre_activation));
    }
    if (n.feature_type === "logit") lines.push("logit " + fmt(n.logit) + ", p " + fmt(n.token_prob));
    if (n.bias !== undefined) {
      lines.push("bias " + fmt(n.bias) + ", upstream bias " + fmt(n.upstream_bias) + ", position " +
        fmt(n.position) + ", links pruned away " + fmt(n.pruned_links));
    }
    return lines.join("\n");
  }

  function renderGraph(g) {
    clear("graph");
    var m = g.metadata;
    view.setAttribute("data-slug", m.slug);
    view.appendChild(el("h2", {}, "“" + m.prompt + "”"));
    var info = m.info || {};
    view.appendChild(el("p", { "class": "muted" }, g.nodes.length + " nodes, " + g.links.length + " links" +
      (m.node_threshold === null ? " (not pruned)" : " (pruned to " + m.node_threshold + " of the influence on the logits)") +
      "; pass: " + (info.pass || "n/a") + ". Rows from the bottom: tokens, " +
      (m.transcoder_list || []).join(", ") + ", logits. Click a feature for its page."));
    var top = 1;
    g.nodes.forEach(function (n) { if (n.feature_type !== "logit" && n.feature_type !== "embedding") top = Math.max(top, parseInt(n.layer, 10) + 2); });
    var byId = {};
    g.nodes.forEach(function (n) { byId[n.node_id] = n; });
    var maxW = 0;
    g.links.forEach(function (l) { maxW = Math.max(maxW, Math.abs(l.weight)); });
    var tokens = m.prompt_tokens;
    // Nodes in prompt order within a row keep the tokens left to right.
    var ordered = g.nodes.slice().sort(function (a, b) { return row(a, top) - row(b, top) || a.ctx_idx - b.ctx_idx; });
    var elkGraph = {
      id: "root",
      layoutOptions: {
        "elk.algorithm": "layered",
        "elk.direction": "UP",
        "elk.partitioning.activate": "true",
        "elk.separateConnectedComponents": "false",
        "elk.layered.considerModelOrder.strategy": "NODES_AND_EDGES",
        "elk.layered.crossingMinimization.forceNodeModelOrder": "true",
        "elk.spacing.nodeNode": "14",
        "elk.layered.spacing.nodeNodeBetweenLayers": "36",
        "elk.edgeRouting": "POLYLINE"
      },
      children: ordered.map(function (n) {
        var text = label(n, tokens);
        return { id: n.node_id, width: Math.max(28, 7 * text.length + 10), height: 22,
          layoutOptions: { "elk.partitioning.partition": String(row(n, top)) } };
      }),
      edges: g.links.filter(function (l) { return byId[l.source] && byId[l.target]; })
        .map(function (l, i) { return { id: "e" + i, sources: [l.source], targets: [l.target] }; })
    };
    var status = el("p", { id: "layout-status" }, "laying out…");
    view.appendChild(status);
    new ELK().layout(elkGraph).then(function (laid) {
      var pos = {};
      laid.children.forEach(function (c) { pos[c.id] = c; });
      var W = laid.width + 20, H = laid.height + 20;
      var s = svg("svg", { id: "graph", width: W, height: H, viewBox: "-10 -10 " + W + " " + H });
      var links = svg("g", { "class": "links" });
      g.links.forEach(function (l) {
        var a = pos[l.source], b = pos[l.target];
        if (!a || !b) return;
        var w = maxW > 0 ? Math.abs(l.weight) / maxW : 0;
        links.appendChild(svg("line", {
          x1: a.x + a.width / 2, y1: a.y, x2: b.x + b.width / 2, y2: b.y + b.height,
          "stroke-width": (0.4 + 5 * w).toFixed(2), "class": l.weight >= 0 ? "pos" : "neg",
          "data-source": l.source, "data-target": l.target
        }, undefined));
        links.lastChild.appendChild(svg("title", {}, l.source + " → " + l.target + ": " + fmt(l.weight)));
      });
      s.appendChild(links);
      var nodes = svg("g", { "class": "nodes" });
      g.nodes.forEach(function (n) {
        var p = pos[n.node_id];
        var kind = n.feature_type === "embedding" ? "token" : n.feature_type === "logit" ? "logit" : (n.module || "").split("_")[0];
        var grp = svg("g", { "class": "node " + kind, "data-node": n.node_id, "data-row": row(n, top),
          transform: "translate(" + p.x + "," + p.y + ")" });
        grp.appendChild(svg("rect", { width: p.width, height: p.height, rx: kind === "token" || kind === "logit" ? 2 : 10 }));
        grp.appendChild(svg("text", { x: p.width / 2, y: 15 }, label(n, tokens)));
        grp.appendChild(svg("title", {}, tooltip(n, tokens)));
        if (n.module !== undefined) {
          var href = "index.html#" + n.module + "/" + n.index;
          grp.setAttribute("data-href", href);
          grp.addEventListener("click", function () { location.href = href; });
        }
        nodes.appendChild(grp);
      });
      s.appendChild(nodes);
      status.remove();
      view.appendChild(s);
      view.setAttribute("data-laid-out", "1");
    }, function (err) {
      status.textContent = "layout failed: " + err;
    });
  }

  function route() {
    var slug = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (!slug) return renderList();
    var known = (S.graphs || []).some(function (g) { return g.slug === slug; });
    if (!known) { clear("missing"); view.appendChild(el("p", {}, "No graph `" + slug + "` in this browser.")); return; }
    S.addGraph = function (g) { renderGraph(g); };
    var sc = el("script", { src: "data/graph-" + slug + ".js" });
    sc.onerror = function () { clear("missing"); view.appendChild(el("p", {}, "Could not load data/graph-" + slug + ".js")); };
    document.body.appendChild(sc);
  }
  if (S.meta) document.getElementById("info").textContent = "suite " + (S.meta.suite || "");
  window.addEventListener("hashchange", route);
  route();
})();
