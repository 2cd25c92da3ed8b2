// scae feature browser: renders the index and feature pages from the data files, which
// define SCAE.meta, SCAE.vocab and (per chunk of features) SCAE.addChunk(...). No network.
(function () {
  "use strict";
  var S = window.SCAE;
  var meta = S.meta;
  var chunks = {};
  var waiting = {};
  S.addChunk = function (module, c, feats) {
    var key = module + "/" + c;
    chunks[key] = feats;
    (waiting[key] || []).forEach(function (f) { f(); });
    delete waiting[key];
  };
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function link(module, f, cls) {
    return el("a", { href: "#" + module + "/" + f, "class": cls || "" }, module + "/" + f);
  }
  function fmt(x, d) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(d); }
  function loadChunk(module, c, done, fail) {
    var key = module + "/" + c;
    if (chunks[key]) return done();
    var first = !waiting[key];
    (waiting[key] = waiting[key] || []).push(done);
    if (first) {
      var s = el("script", { src: "data/" + module + "-" + c + ".js" });
      s.onerror = fail;
      document.body.appendChild(s);
    }
  }
  var view = document.getElementById("view");
  function clear(kind, id) {
    view.textContent = "";
    view.setAttribute("data-view", kind);
    if (id) view.setAttribute("data-feature", id); else view.removeAttribute("data-feature");
  }
  document.getElementById("info").textContent =
    meta.n_tokens + " tokens, " + meta.modules.length + " modules × " + meta.n_features +
    " features, k " + meta.k + "; activations from the " + meta.pass + " pass" +
    (meta.pass === "pruned" ? " (each feature's connections are listed on its page)" : "");
  document.getElementById("jump").addEventListener("submit", function (ev) {
    ev.preventDefault();
    location.hash = document.getElementById("jump-to").value.trim();
  });

  // The index: modules, then the chosen module's features, sortable.
  function renderIndex(module, sortKey) {
    clear("index");
    if (S.graphs && S.graphs.length) {
      view.appendChild(el("h2", {}, "Attribution graphs"));
      var gl = el("ul", { id: "graphs" });
      S.graphs.forEach(function (g) {
        var li = el("li");
        li.appendChild(el("a", { href: "graph.html#" + g.slug }, g.slug));
        li.appendChild(document.createTextNode(" — “" + g.prompt + "”, " + g.nodes + " nodes"));
        gl.appendChild(li);
      });
      view.appendChild(gl);
    }
    view.appendChild(el("h2", {}, "Modules"));
    var t = el("table", { id: "modules" });
    t.innerHTML = "<tr><th>module</th><th class='num'>firing</th><th class='num'>dead</th><th class='num'>mean density %</th></tr>";
    meta.modules.forEach(function (m) {
      var ix = meta.index[m];
      var alive = ix.freq.filter(function (x) { return x > 0; }).length;
      var mean = ix.freq.reduce(function (a, b) { return a + b; }, 0) / ix.freq.length;
      var r = el("tr");
      var td = el("td"); td.appendChild(el("a", { href: "#" + m }, m)); r.appendChild(td);
      r.appendChild(el("td", { "class": "num" }, String(alive)));
      r.appendChild(el("td", { "class": "num" }, (100 * (1 - alive / ix.freq.length)).toFixed(1) + "%"));
      r.appendChild(el("td", { "class": "num" }, (mean / 1e3).toFixed(3)));
      t.appendChild(r);
    });
    view.appendChild(t);
    module = module || meta.modules[0];
    var ix = meta.index[module];
    if (!ix) { view.appendChild(el("p", {}, "No module " + module)); return; }
    view.appendChild(el("h2", {}, "Features of " + module));
    // Density: the share of tokens a feature fires on, as log10 over the firing features.
    var lo = -6, hi = 0, nb = 24, counts = [], deadN = 0;
    for (var b = 0; b < nb; b++) counts.push(0);
    ix.freq.forEach(function (x) {
      if (x <= 0) { deadN++; return; }
      var l = Math.log10(x / 1e5), k = Math.floor((l - lo) / (hi - lo) * nb);
      counts[Math.max(0, Math.min(nb - 1, k))]++;
    });
    view.appendChild(el("h3", {}, "Firing density of the " + (ix.freq.length - deadN) + " features that fire (" + deadN + " never fire)"));
    view.appendChild(bars("density", counts, "1e" + lo, "1", "log10 density (share of tokens it fires on)", "features"));
    var order = ix.freq.map(function (_, i) { return i; });
    sortKey = sortKey || "freq";
    if (sortKey !== "feature") order.sort(function (a, b) { return ix[sortKey][b] - ix[sortKey][a] || a - b; });
    var ft = el("table", { id: "features" });
    var head = el("tr");
    [["feature", "feature"], ["freq", "density %"], ["max", "max activation"]].forEach(function (c) {
      var th = el("th", { "class": "sort" + (c[0] === "feature" ? "" : " num"), "data-sort": c[0] }, c[1]);
      th.addEventListener("click", function () { renderIndex(module, c[0]); });
      head.appendChild(th);
    });
    ft.appendChild(head);
    order.forEach(function (i) {
      var dead = ix.freq[i] === 0;
      var r = el("tr", dead ? { "class": "dead" } : {});
      var td = el("td"); td.appendChild(link(module, i)); if (dead) td.appendChild(el("span", { "class": "tag" }, " dead"));
      r.appendChild(td);
      r.appendChild(el("td", { "class": "num" }, fmt(ix.freq[i] / 1e3, 4)));
      r.appendChild(el("td", { "class": "num" }, fmt(ix.max[i], 3)));
      ft.appendChild(r);
    });
    view.appendChild(ft);
  }

  function context(c, box) {
    // c = [act, seq, pos, at, tokens, acts in % of the feature's max]
    var d = el("div", { "class": "ctx", title: "sequence " + c[1] + ", position " + c[2] });
    d.appendChild(el("span", { "class": "act" }, fmt(c[0], 3)));
    c[4].forEach(function (tok, k) {
      var s = el("span", { "class": "tok" + (k === c[3] ? " max" : ""), title: (c[5][k] || 0) + "% of max" },
        S.vocab[tok] !== undefined ? S.vocab[tok] : "<" + tok + ">");
      var a = (c[5][k] || 0) / 100;
      if (a > 0) s.style.background = "rgba(230, 90, 40, " + (0.15 + 0.85 * a).toFixed(3) + ")";
      d.appendChild(s);
      d.appendChild(document.createTextNode(" "));
    });
    box.appendChild(d);
    if (c[6]) whyLine(c[6], box);
  }

  function tokText(t) { return S.vocab[t] !== undefined ? S.vocab[t] : "<" + t + ">"; }
  function signed(x) { return (x >= 0 ? "+" : "−") + fmt(Math.abs(x), 3); }
  // Why a top context fired: w = [pre, fixed, rest, [[kind, a, b, dpos, weight], ...]], the
  // exact terms of the pre-activation at that position (as an attribution graph's links).
  function whyLine(w, box) {
    var d = el("div", { "class": "why", title: "the exact terms of the pre-activation here: the largest links " +
      "(an upstream feature or a token, @-n: n tokens earlier), the other links, and the feature's own biases " +
      "and positional term; they add up to the pre-activation" });
    d.appendChild(el("span", { "class": "act" }, "why:"));
    w[3].forEach(function (t) {
      var s = el("span", { "class": "term " + (t[4] >= 0 ? "plus" : "minus") });
      if (t[0] === 0) s.appendChild(link(meta.modules[t[1]], t[2], "src"));
      else s.appendChild(el("span", { "class": "tok" }, "“" + tokText(t[1]) + "”"));
      s.appendChild(document.createTextNode((t[3] ? " @" + t[3] : "") + " " + signed(t[4])));
      d.appendChild(s);
    });
    d.appendChild(el("span", { "class": "term" }, "other links " + signed(w[2])));
    d.appendChild(el("span", { "class": "term" }, "biases and position " + signed(w[1])));
    d.appendChild(el("span", { "class": "term" }, "= " + fmt(w[0], 3)));
    box.appendChild(d);
  }

  // A bar chart with labelled axes: counts[i] over bins from lo to hi.
  function bars(id, counts, lo, hi, xLabel, yLabel) {
    var w = 320, h = 90, L = 34, n = Math.max(1, counts.length), top = Math.max.apply(null, counts.concat([1]));
    var svg = '<svg xmlns="http://www.w3.org/2000/svg" width="' + (w + L + 4) + '" height="' + (h + 34) + '" id="' + id + '">';
    counts.forEach(function (c, i) {
      var bh = Math.round(h * c / top);
      svg += '<rect class="bar" x="' + (L + i * w / n + 1) + '" y="' + (h - bh) + '" width="' + Math.max(1, w / n - 2) + '" height="' + bh + '"><title>' + c + '</title></rect>';
    });
    svg += '<line class="axis" x1="' + L + '" y1="' + h + '" x2="' + (L + w) + '" y2="' + h + '"/>';
    svg += '<line class="axis" x1="' + L + '" y1="0" x2="' + L + '" y2="' + h + '"/>';
    svg += '<text class="tick" x="' + (L - 3) + '" y="10" text-anchor="end">' + top + '</text>';
    svg += '<text class="tick" x="' + (L - 3) + '" y="' + h + '" text-anchor="end">0</text>';
    svg += '<text class="tick" x="' + L + '" y="' + (h + 13) + '">' + lo + '</text>';
    svg += '<text class="tick" x="' + (L + w) + '" y="' + (h + 13) + '" text-anchor="end">' + hi + '</text>';
    svg += '<text class="label x" x="' + (L + w / 2) + '" y="' + (h + 28) + '" text-anchor="middle">' + xLabel + '</text>';
    svg += '<text class="label y" x="-' + (h / 2) + '" y="10" transform="rotate(-90)" text-anchor="middle">' + yLabel + '</text></svg>';
    var d = el("div"); d.innerHTML = svg; return d;
  }
  function histogram(f) {
    return bars("hist", f.hist, "0", fmt(f.max, 2), "activation (sampled when firing)", "count");
  }

  function isDead(module, i) { return meta.index[module] && meta.index[module].freq[i] === 0; }
  // Connections by score, highest first (unknown scores last), features that never fired marked.
  function linkTable(rows, cls, head) {
    var t = el("table", { "class": cls });
    t.innerHTML = "<tr><th>" + head + "</th><th class='num'>score</th></tr>";
    var sorted = rows.slice().sort(function (a, b) {
      var x = a[2] === null ? -Infinity : a[2], y = b[2] === null ? -Infinity : b[2];
      return y - x || a[0] - b[0] || a[1] - b[1];
    });
    sorted.forEach(function (r) {
      // r = [module index, feature, score]
      var m = meta.modules[r[0]], dead = isDead(m, r[1]);
      var tr = el("tr", dead ? { "class": "dead" } : {}), td = el("td");
      td.appendChild(link(m, r[1], cls));
      if (dead) td.appendChild(el("span", { "class": "tag" }, " never fired"));
      tr.appendChild(td);
      tr.appendChild(el("td", { "class": "num" }, fmt(r[2], 4)));
      t.appendChild(tr);
    });
    return t;
  }

  function renderFeature(module, j) {
    clear("loading");
    if (!meta.index[module] || !(j >= 0 && j < meta.n_features)) {
      clear("missing"); view.appendChild(el("p", {}, "No feature " + module + "/" + j)); return;
    }
    var c = Math.floor(j / meta.chunk);
    loadChunk(module, c, function () {
      var f = chunks[module + "/" + c][j - c * meta.chunk];
      clear("feature", module + "/" + j);
      var h = el("h2", {}, module + " / " + j);
      if (f.n === 0) h.appendChild(el("span", { "class": "tag" }, " dead: never fired on these tokens"));
      view.appendChild(h);
      var nav = el("p");
      if (j > 0) nav.appendChild(link(module, j - 1, "prev"));
      nav.appendChild(document.createTextNode("  ·  "));
      nav.appendChild(el("a", { href: "#" + module }, "all of " + module));
      nav.appendChild(document.createTextNode("  ·  "));
      if (j + 1 < meta.n_features) nav.appendChild(link(module, j + 1, "next"));
      view.appendChild(nav);
      view.appendChild(el("p", { id: "stats" }, "fires on " + f.n + " of " + meta.n_tokens + " tokens (" +
        (100 * f.n / Math.max(1, meta.n_tokens)).toFixed(3) + "%), max " + fmt(f.max, 3) + ", mean when firing " + fmt(f.mean, 3)));
      view.appendChild(el("h3", {}, "Activations when firing (histogram of a sample of " + f.hist.reduce(function (a, b) { return a + b; }, 0) + ")"));
      view.appendChild(histogram(f));
      var cols = el("div", { "class": "cols" });
      var left = el("div", { id: "contexts" });
      left.appendChild(el("h3", {}, "Top activating contexts"));
      if (!f.top.length) left.appendChild(el("p", { "class": "muted" }, "none"));
      f.top.forEach(function (x) { context(x, left); });
      left.appendChild(el("h3", {}, "Examples from lower quantiles (3/4, 1/2, 1/4 of a random sample)"));
      if (!f.q.length) left.appendChild(el("p", { "class": "muted" }, "too few activations"));
      f.q.forEach(function (x) { context(x, left); });
      cols.appendChild(left);
      var right = el("div");
      right.appendChild(el("h3", {}, "Logit lens (decoder direction · W_U)"));
      var lt = el("table", { id: "lens" });
      lt.innerHTML = "<tr><th>promotes</th><th class='num'></th><th>suppresses</th><th class='num'></th></tr>";
      for (var k = 0; k < Math.max(f.lt.length, f.lb.length); k++) {
        var tr = el("tr");
        [f.lt[k], f.lb[k]].forEach(function (p) {
          tr.appendChild(el("td", { "class": "tok" }, p ? (S.vocab[p[0]] !== undefined ? S.vocab[p[0]] : "<" + p[0] + ">") : ""));
          tr.appendChild(el("td", { "class": "num" }, p ? fmt(p[1], 2) : ""));
        });
        lt.appendChild(tr);
      }
      right.appendChild(lt);
      right.appendChild(el("h3", {}, "Upstream connections (" + f.up.length + ")"));
      right.appendChild(f.up.length ? linkTable(f.up, "up", "listens to") :
        el("p", { "class": "muted" }, meta.pass === "all-connections" ? "all preceding features (no connection set)" : "none"));
      // Tokens wired in (embed connections) and out (unembed connections), [token, score].
      [["emb", "Input tokens (embed connections, "], ["out", "Output tokens (unembed connections, "]].forEach(function (k) {
        var rows = f[k[0]];
        if (!rows || !rows.length) return;
        right.appendChild(el("h3", {}, k[1] + rows.length + ")"));
        var et = el("table", { id: k[0] });
        et.innerHTML = "<tr><th>token</th><th class='num'>score</th></tr>";
        rows.forEach(function (p) {
          var tr = el("tr");
          tr.appendChild(el("td", { "class": "tok" }, S.vocab[p[0]] !== undefined ? S.vocab[p[0]] : "<" + p[0] + ">"));
          tr.appendChild(el("td", { "class": "num" }, fmt(p[1], 4)));
          et.appendChild(tr);
        });
        right.appendChild(et);
      });
      right.appendChild(el("h3", {}, "Downstream listeners (" + f.down.length + ")"));
      right.appendChild(f.down.length ? linkTable(f.down, "down", "heard by") : el("p", { "class": "muted" }, "none"));
      cols.appendChild(right);
      view.appendChild(cols);
      // Test hook: ?follow=up clicks the first upstream link once (a navigation through the page).
      if (/[?&]follow=up/.test(location.search) && !S.followed) {
        var a = view.querySelector("a.up");
        if (a) { S.followed = true; a.click(); }
      }
    }, function () {
      clear("missing"); view.appendChild(el("p", {}, "Could not load data/" + module + "-" + c + ".js"));
    });
  }

  // Token search: features whose top contexts fire on the token, or whose logit lens promotes it.
  var shards = {};
  S.addSearch = function (h, map) { shards[h] = map; (waiting["search/" + h] || []).forEach(function (f) { f(); }); };
  function searchKey(t) { return t.trim().toLowerCase(); }
  function shardOf(key) {
    var h = 0;
    for (var ch of key) h = (Math.imul(h, 31) + ch.codePointAt(0)) >>> 0;
    return h % meta.search_shards;
  }
  function renderSearch(text) {
    clear("search");
    var key = searchKey(text), h = shardOf(key);
    view.appendChild(el("h2", {}, "Features for the token “" + text + "”"));
    var show = function () {
      var hits = (shards[h] || {})[key] || [];
      [[0, "Top contexts fire on it", function (x) { return x[3] + " of its top contexts"; }],
       [1, "Logit lens promotes it", function (x) { return "rank " + x[3]; }]].forEach(function (kind) {
        var rows = hits.filter(function (x) { return x[2] === kind[0]; });
        // Most contexts first; best lens rank first.
        rows.sort(function (a, b) { return (kind[0] === 0 ? b[3] - a[3] : a[3] - b[3]) || a[0] - b[0] || a[1] - b[1]; });
        view.appendChild(el("h3", {}, kind[1] + " (" + rows.length + ")"));
        var ul = el("ul", { "class": "hits" });
        rows.forEach(function (x) {
          var li = el("li"); li.appendChild(link(meta.modules[x[0]], x[1]));
          li.appendChild(document.createTextNode(" — " + kind[2](x))); ul.appendChild(li);
        });
        view.appendChild(rows.length ? ul : el("p", { "class": "muted" }, "none"));
      });
    };
    if (shards[h]) return show();
    (waiting["search/" + h] = waiting["search/" + h] || []).push(show);
    var sc = el("script", { src: "data/search-" + h + ".js" });
    sc.onerror = function () { view.appendChild(el("p", {}, "Could not load data/search-" + h + ".js")); };
    document.body.appendChild(sc);
  }
  document.getElementById("search").addEventListener("submit", function (ev) {
    ev.preventDefault();
    location.hash = "search/" + document.getElementById("search-for").value;
  });

  function route() {
    var h = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (!h) return renderIndex();
    if (h.indexOf("search/") === 0) return renderSearch(h.slice(7));
    var parts = h.split("/");
    if (parts.length === 1) return renderIndex(parts[0]);
    renderFeature(parts[0], parseInt(parts[1], 10));
  }
  window.addEventListener("hashchange", route);
  route();
})();
