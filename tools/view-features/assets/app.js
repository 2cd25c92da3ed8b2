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
    t.innerHTML = "<tr><th>module</th><th class='num'>firing</th><th class='num'>dead</th><th class='num'>mean freq /1e5 tokens</th></tr>";
    meta.modules.forEach(function (m) {
      var ix = meta.index[m];
      var alive = ix.freq.filter(function (x) { return x > 0; }).length;
      var mean = ix.freq.reduce(function (a, b) { return a + b; }, 0) / ix.freq.length;
      var r = el("tr");
      var td = el("td"); td.appendChild(el("a", { href: "#" + m }, m)); r.appendChild(td);
      r.appendChild(el("td", { "class": "num" }, String(alive)));
      r.appendChild(el("td", { "class": "num" }, (100 * (1 - alive / ix.freq.length)).toFixed(1) + "%"));
      r.appendChild(el("td", { "class": "num" }, mean.toFixed(1)));
      t.appendChild(r);
    });
    view.appendChild(t);
    module = module || meta.modules[0];
    var ix = meta.index[module];
    if (!ix) { view.appendChild(el("p", {}, "No module " + module)); return; }
    view.appendChild(el("h2", {}, "Features of " + module));
    var order = ix.freq.map(function (_, i) { return i; });
    sortKey = sortKey || "freq";
    if (sortKey !== "feature") order.sort(function (a, b) { return ix[sortKey][b] - ix[sortKey][a] || a - b; });
    var ft = el("table", { id: "features" });
    var head = el("tr");
    [["feature", "feature"], ["freq", "freq /1e5 tokens"], ["max", "max activation"]].forEach(function (c) {
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
      r.appendChild(el("td", { "class": "num" }, fmt(ix.freq[i], 1)));
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
  }

  function histogram(f) {
    var w = 320, h = 90, n = Math.max(1, f.hist.length), top = Math.max.apply(null, f.hist.concat([1]));
    var svg = '<svg xmlns="http://www.w3.org/2000/svg" width="' + w + '" height="' + (h + 18) + '" id="hist">';
    f.hist.forEach(function (c, i) {
      var bh = Math.round(h * c / top);
      svg += '<rect class="bar" x="' + (i * w / n + 1) + '" y="' + (h - bh) + '" width="' + (w / n - 2) + '" height="' + bh + '"><title>' + c + '</title></rect>';
    });
    svg += '<text x="0" y="' + (h + 14) + '" font-size="11">0</text><text x="' + (w - 40) + '" y="' + (h + 14) + '" font-size="11">' + fmt(f.max, 2) + '</text></svg>';
    var d = el("div"); d.innerHTML = svg; return d;
  }

  function linkTable(rows, cls, head) {
    var t = el("table", { "class": cls });
    t.innerHTML = "<tr><th>" + head + "</th><th class='num'>score</th></tr>";
    rows.forEach(function (r) {
      // r = [module index, feature, score]
      var tr = el("tr"), td = el("td");
      td.appendChild(link(meta.modules[r[0]], r[1], cls)); tr.appendChild(td);
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

  function route() {
    var h = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (!h) return renderIndex();
    var parts = h.split("/");
    if (parts.length === 1) return renderIndex(parts[0]);
    renderFeature(parts[0], parseInt(parts[1], 10));
  }
  window.addEventListener("hashchange", route);
  route();
})();
