/* mishax-py attribution-graph viewer (written into the page by mishax_py/circuits/viewer.py).
 *
 * Data: the JSON block #graph-data holds the pruned graph at the file's
 * thresholds (nodes with their cumulative influence, edges [source, target, weight] by node index).
 * Drawing: one SVG; rows are layers (embeddings at the bottom, logits at the top), columns are
 * prompt positions; nodes at one (layer, position) sit side by side and wrap.
 * Thresholds: at the file's thresholds the view is exactly the embedded graph. Tighter ones are
 * recomputed here: nodes by their cumulative influence (exact: influence does not depend on the
 * thresholds), edges by circuit-tracer's edge score (row-normalised |weight| times the target's
 * influence on the logits) computed on the embedded subgraph, keeping the share
 * edge_threshold / file_edge_threshold of it, then features without an incoming or outgoing edge
 * are dropped as prune() does.
 * Opening the file with #selftest runs a check on load and writes its result into #selftest.
 */
(function () {
  'use strict';
  var SVGNS = 'http://www.w3.org/2000/svg';
  var errors = [];
  window.addEventListener('error', function (ev) { errors.push(String(ev.message || ev)); flagErrors(); });
  var origError = console.error;
  console.error = function () {
    errors.push(Array.prototype.map.call(arguments, String).join(' '));
    flagErrors();
    return origError.apply(console, arguments);
  };
  function flagErrors() {
    if (document.body) { document.body.setAttribute('data-errors', String(errors.length)); }
  }

  var D = JSON.parse(document.getElementById('graph-data').textContent);
  var N = D.nodes;
  var E = D.edges; // [source index, target index, weight]
  var inEdges = N.map(function () { return []; });
  var outEdges = N.map(function () { return []; });
  E.forEach(function (e, k) { outEdges[e[0]].push(k); inEdges[e[1]].push(k); });
  var nPos = Math.max(D.prompt_tokens.length, 1 + N.reduce(function (m, n) { return Math.max(m, n.pos); }, 0));

  // Rows: every layer of the embedded graph, bottom (embeddings) to top (logits); stable under the sliders.
  function rowKey(n) { return n.type === 'embedding' ? -1e9 : (n.type === 'logit' ? 1e9 : n.layer); }
  var rowKeys = Array.from(new Set(N.map(rowKey))).sort(function (a, b) { return a - b; });
  function rowName(k) { return k === -1e9 ? 'emb' : (k === 1e9 ? 'logits' : 'L' + k); }

  var state = { nt: D.node_threshold, et: D.edge_threshold, selected: -1, visN: null, visE: null };
  var geom = { x: [], y: [] };

  // ------------------------------------------------------------------ thresholds
  function visibleSets(nt, et) {
    var fullN = nt >= D.node_threshold - 1e-9, fullE = et >= D.edge_threshold - 1e-9;
    var visN = N.map(function () { return true; });
    var visE = E.map(function () { return true; });
    if (fullN && fullE) { return { nodes: visN, edges: visE }; }
    if (!fullN) {
      // prune() keeps the nodes ranked up to the first whose cumulative influence reaches nt.
      var cut = Infinity;
      N.forEach(function (n) { if (n.infl !== null && n.infl >= nt && n.infl < cut) { cut = n.infl; } });
      N.forEach(function (n, i) { if (!n.always && n.infl !== null) { visN[i] = n.infl <= cut; } });
    }
    E.forEach(function (e, k) { visE[k] = visN[e[0]] && visN[e[1]]; });
    if (!fullE || !fullN) {
      var scores = edgeScores(visN, visE);
      var share = Math.min(1, et / D.edge_threshold);
      if (share < 1) {
        var sorted = [];
        E.forEach(function (e, k) { if (visE[k]) { sorted.push(scores[k]); } });
        sorted.sort(function (a, b) { return b - a; });
        var total = sorted.reduce(function (s, v) { return s + v; }, 0);
        var thr = 0, acc = 0;
        for (var j = 0; j < sorted.length; j++) {
          acc += sorted[j];
          thr = sorted[j];
          if (total <= 0 || acc / total >= share) { break; }
        }
        E.forEach(function (e, k) { if (visE[k] && (scores[k] < thr || e[2] === 0)) { visE[k] = false; } });
      }
    }
    // Drop features/errors without an outgoing edge and features without an incoming one, until stable.
    for (var changed = true; changed;) {
      changed = false;
      N.forEach(function (n, i) {
        if (!visN[i] || n.always) { return; }
        var hasOut = outEdges[i].some(function (k) { return visE[k] && visN[E[k][1]]; });
        var hasIn = n.type !== 'feature' || inEdges[i].some(function (k) { return visE[k] && visN[E[k][0]]; });
        if (!hasOut || !hasIn) { visN[i] = false; changed = true; }
      });
      E.forEach(function (e, k) { if (visE[k] && !(visN[e[0]] && visN[e[1]])) { visE[k] = false; } });
    }
    return { nodes: visN, edges: visE };
  }

  function edgeScores(visN, visE) {
    // circuit-tracer: normalise |A| by rows, influence = w (A + A^2 + ...), edge score = norm * (influence + w).
    var rowSum = N.map(function () { return 0; });
    E.forEach(function (e, k) { if (visE[k]) { rowSum[e[1]] += Math.abs(e[2]); } });
    var infl = N.map(function (n) { return 0; });
    var weight = N.map(function (n) { return n.type === 'logit' ? (n.prob || 0) : 0; });
    var pending = N.map(function (n, i) {
      return outEdges[i].filter(function (k) { return visE[k]; }).length;
    });
    var queue = [];
    N.forEach(function (n, i) { if (visN[i] && pending[i] === 0) { queue.push(i); } });
    var scores = E.map(function () { return 0; });
    while (queue.length) {
      var t = queue.pop();
      var total = infl[t] + weight[t];
      inEdges[t].forEach(function (k) {
        if (!visE[k]) { return; }
        var s = E[k][0];
        var sc = rowSum[t] > 0 ? Math.abs(E[k][2]) / rowSum[t] * total : 0;
        scores[k] = sc;
        infl[s] += sc;
        pending[s] -= 1;
        if (pending[s] === 0) { queue.push(s); }
      });
    }
    return scores;
  }

  // ------------------------------------------------------------------------ layout
  var GAP = { feature: 20, error: 20, embedding: 20, logit: 92 };
  var PER_LINE = { feature: 8, error: 8, embedding: 8, logit: 2 };
  var LINE_H = { feature: 22, error: 22, embedding: 22, logit: 40 };
  var LEFT = 64, TOP = 24, BOTTOM = 64, MIN_COL = 74;

  function kindOf(n) { return GAP[n.type] ? n.type : 'feature'; }

  function layout(visN) {
    var cells = {};
    N.forEach(function (n, i) {
      if (!visN[i]) { return; }
      var key = rowKey(n) + '|' + n.pos;
      (cells[key] = cells[key] || []).push(i);
    });
    var colW = [], rowH = {};
    for (var p = 0; p < nPos; p++) { colW.push(MIN_COL); }
    rowKeys.forEach(function (r) { rowH[r] = 54; });
    Object.keys(cells).forEach(function (key) {
      var members = cells[key];
      var n0 = N[members[0]], kind = kindOf(n0);
      var per = PER_LINE[kind], lines = Math.ceil(members.length / per);
      colW[n0.pos] = Math.max(colW[n0.pos], Math.min(members.length, per) * GAP[kind] + 24);
      rowH[rowKey(n0)] = Math.max(rowH[rowKey(n0)], lines * LINE_H[kind] + 32);
    });
    var colX = [], x = LEFT;
    colW.forEach(function (w) { colX.push(x + w / 2); x += w; });
    var width = x + 16;
    var rowY = {}, y = TOP;
    rowKeys.slice().reverse().forEach(function (r) { rowY[r] = y + rowH[r] / 2; y += rowH[r]; });
    var height = y + BOTTOM;
    var gx = N.map(function () { return null; }), gy = N.map(function () { return null; });
    Object.keys(cells).forEach(function (key) {
      var members = cells[key].slice();
      members.sort(function (a, b) {
        var na = N[a], nb = N[b];
        if (na.type !== nb.type) { return na.type === 'error' ? 1 : (nb.type === 'error' ? -1 : 0); }
        return (na.infl === null ? 2 : na.infl) - (nb.infl === null ? 2 : nb.infl) || a - b;
      });
      var n0 = N[members[0]], kind = kindOf(n0), per = PER_LINE[kind];
      var lines = Math.ceil(members.length / per);
      members.forEach(function (i, j) {
        var line = Math.floor(j / per), col = j % per;
        var inLine = Math.min(per, members.length - line * per);
        gx[i] = colX[n0.pos] + (col - (inLine - 1) / 2) * GAP[kind];
        gy[i] = rowY[rowKey(n0)] + (line - (lines - 1) / 2) * LINE_H[kind];
      });
    });
    return { x: gx, y: gy, colX: colX, rowY: rowY, width: width, height: height };
  }

  // ------------------------------------------------------------------------ drawing
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVGNS, name);
    Object.keys(attrs || {}).forEach(function (a) { e.setAttribute(a, attrs[a]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) { return '–'; }
    var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
  }
  function shortText(s, k) { s = String(s); return s.length > k ? s.slice(0, k - 1) + '…' : s; }
  function nodeName(i) {
    var n = N[i];
    if (n.type === 'embedding') { return 'emb "' + n.token + '"@' + n.pos; }
    if (n.type === 'logit') { return 'logit "' + n.token + '"'; }
    if (n.type === 'error') { return 'L' + n.layer + ' error@' + n.pos; }
    return 'L' + n.layer + ' #' + (n.feature === null ? '?' : n.feature) + '@' + n.pos;
  }

  function draw() {
    var svg = document.getElementById('graph');
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var visN = state.visN, visE = state.visE;
    var L = layout(visN);
    geom = L;
    svg.setAttribute('width', L.width);
    svg.setAttribute('height', L.height);
    svg.setAttribute('viewBox', '0 0 ' + L.width + ' ' + L.height);
    var axis = el('g', { 'class': 'axis' }, svg);
    rowKeys.forEach(function (r) {
      el('line', { 'class': 'row-line', x1: LEFT - 6, x2: L.width - 8, y1: L.rowY[r], y2: L.rowY[r] }, axis);
      var t = el('text', { x: 8, y: L.rowY[r] + 4 }, axis);
      t.textContent = rowName(r);
    });
    for (var p = 0; p < nPos; p++) {
      var tok = p < D.prompt_tokens.length ? D.prompt_tokens[p] : '';
      var tt = el('text', { x: L.colX[p], y: L.height - BOTTOM + 22, 'text-anchor': 'middle' }, axis);
      tt.textContent = shortText(tok, 10);
      var tl = el('title', {}, tt);
      tl.textContent = tok;
      var ti = el('text', { x: L.colX[p], y: L.height - BOTTOM + 38, 'text-anchor': 'middle', fill: '#777' }, axis);
      ti.textContent = String(p);
    }
    var edgeG = el('g', { id: 'edges' }, svg);
    var wmax = 0;
    E.forEach(function (e, k) { if (visE[k]) { wmax = Math.max(wmax, Math.abs(e[2])); } });
    wmax = wmax || 1;
    var order = [];
    E.forEach(function (e, k) { if (visE[k]) { order.push(k); } });
    order.sort(function (a, b) { return Math.abs(E[a][2]) - Math.abs(E[b][2]); });
    order.forEach(function (k) {
      var e = E[k], s = Math.abs(e[2]) / wmax;
      el('path', {
        'class': 'edge ' + (e[2] >= 0 ? 'pos' : 'neg'), d: edgePath(e[0], e[1]),
        'stroke-width': (0.4 + 3.6 * s).toFixed(2), opacity: (0.18 + 0.62 * s).toFixed(2),
        'data-k': k, 'data-s': e[0], 'data-t': e[1], 'data-w': e[2]
      }, edgeG);
    });
    var nodeG = el('g', { id: 'nodes' }, svg);
    N.forEach(function (n, i) {
      if (!visN[i]) { return; }
      var g = el('g', {
        'class': 'node ' + kindOf(n), transform: 'translate(' + L.x[i] + ',' + L.y[i] + ')',
        'data-i': i, 'data-id': n.id
      }, nodeG);
      if (n.type === 'feature') { el('circle', { 'class': 'glyph', r: 6.5 }, g); }
      else if (n.type === 'error') { el('rect', { 'class': 'glyph', x: -5.5, y: -5.5, width: 11, height: 11 }, g); }
      else if (n.type === 'embedding') { el('rect', { 'class': 'glyph', x: -7, y: -7, width: 14, height: 14 }, g); }
      else if (n.type === 'logit') {
        el('polygon', { 'class': 'glyph', points: '0,-8 8,0 0,8 -8,0' }, g);
        var lt = el('text', { x: 0, y: 21, 'text-anchor': 'middle' }, g);
        lt.textContent = shortText(n.token, 10) + ' ' + (n.prob === null ? '' : n.prob.toFixed(3));
      } else { el('circle', { 'class': 'glyph', r: 6.5 }, g); }
      g.addEventListener('mouseenter', function (ev) { showTip(i, ev); });
      g.addEventListener('mousemove', function (ev) { moveTip(ev); });
      g.addEventListener('mouseleave', hideTip);
      g.addEventListener('click', function (ev) { ev.stopPropagation(); select(state.selected === i ? -1 : i); });
    });
    el('g', { id: 'labels' }, svg);
    var nv = visN.filter(Boolean).length, ne = visE.filter(Boolean).length;
    document.getElementById('counts').textContent =
      'showing ' + nv + ' of ' + N.length + ' nodes, ' + ne + ' of ' + E.length + ' edges';
    document.body.setAttribute('data-drawn-nodes', String(nv));
    document.body.setAttribute('data-drawn-edges', String(ne));
    if (state.selected >= 0 && !visN[state.selected]) { state.selected = -1; }
    select(state.selected);
  }

  function boxOf(t) {
    var b = t.getBBox();
    var m = t.transform && t.parentNode && t.parentNode.getAttribute('transform');
    var dx = 0, dy = 0;
    if (m) {
      var mm = /translate\(([-\d.e]+),([-\d.e]+)\)/.exec(m);
      if (mm) { dx = +mm[1]; dy = +mm[2]; }
    }
    return { x0: b.x + dx - 1, y0: b.y + dy - 1, x1: b.x + dx + b.width + 1, y1: b.y + dy + b.height + 1 };
  }
  function overlap(a, b) { return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1; }
  function curvePoint(s, t, u) {
    // the cubic Bezier of edgePath at parameter u
    var x0 = geom.x[s], y0 = geom.y[s], x1 = geom.x[t], y1 = geom.y[t], dy = (y0 - y1) * 0.45;
    var a = (1 - u) * (1 - u) * (1 - u), b = 3 * (1 - u) * (1 - u) * u, c = 3 * (1 - u) * u * u, d = u * u * u;
    return [a * x0 + b * x0 + c * x1 + d * x1, a * y0 + b * (y0 - dy) + c * (y1 + dy) + d * y1];
  }

  function edgePath(s, t) {
    var x0 = geom.x[s], y0 = geom.y[s], x1 = geom.x[t], y1 = geom.y[t];
    var dy = (y0 - y1) * 0.45;
    return 'M' + x0.toFixed(1) + ',' + y0.toFixed(1) + ' C' + x0.toFixed(1) + ',' + (y0 - dy).toFixed(1) + ' ' +
      x1.toFixed(1) + ',' + (y1 + dy).toFixed(1) + ' ' + x1.toFixed(1) + ',' + y1.toFixed(1);
  }

  // ------------------------------------------------------------------------ tooltip
  function row(parent, key, value) {
    var d = document.createElement('div');
    var k = document.createElement('span');
    k.className = 'k';
    k.textContent = key + ': ';
    d.appendChild(k);
    d.appendChild(document.createTextNode(value));
    parent.appendChild(d);
  }
  function showTip(i, ev) {
    var n = N[i], tip = document.getElementById('tip');
    while (tip.firstChild) { tip.removeChild(tip.firstChild); }
    var b = document.createElement('b');
    b.textContent = nodeName(i);
    tip.appendChild(b);
    row(tip, 'id', n.id);
    row(tip, 'kind', n.feature_type);
    row(tip, 'layer', n.type === 'embedding' ? 'embedding' : (n.type === 'logit' ? 'logits' : String(n.layer)));
    row(tip, 'position', n.pos + (n.pos < D.prompt_tokens.length ? ' ("' + D.prompt_tokens[n.pos] + '")' : ''));
    if (n.type === 'logit') { row(tip, 'token', n.token); row(tip, 'probability', fmt(n.prob)); }
    if (n.act !== null) { row(tip, 'activation', fmt(n.act)); }
    if (n.infl !== null) { row(tip, 'cumulative influence', fmt(n.infl)); }
    if (n.label) { row(tip, 'label', n.label); }
    if (n.contexts && n.contexts.length) {
      var h = document.createElement('div');
      h.className = 'k';
      h.textContent = 'top-activating contexts:';
      tip.appendChild(h);
      var ul = document.createElement('ul');
      n.contexts.forEach(function (c) {
        var li = document.createElement('li');
        li.className = 'ctx';
        li.textContent = c;
        ul.appendChild(li);
      });
      tip.appendChild(ul);
    }
    var nin = inEdges[i].filter(function (k) { return state.visE[k]; }).length;
    var nout = outEdges[i].filter(function (k) { return state.visE[k]; }).length;
    row(tip, 'edges shown', nin + ' in, ' + nout + ' out (click to trace)');
    tip.style.display = 'block';
    moveTip(ev);
  }
  function moveTip(ev) {
    var tip = document.getElementById('tip');
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = Math.max(0, ev.clientX - tip.offsetWidth - 14); }
    if (y + tip.offsetHeight > window.innerHeight) { y = Math.max(0, ev.clientY - tip.offsetHeight - 14); }
    tip.style.left = x + 'px';
    tip.style.top = y + 'px';
  }
  function hideTip() { document.getElementById('tip').style.display = 'none'; }

  // ---------------------------------------------------------------------- selection
  var TOP_DIRECT = 5, TOP_PATHS = 3;

  function strongest(list) {
    return list.filter(function (k) { return state.visE[k]; })
      .sort(function (a, b) { return Math.abs(E[b][2]) - Math.abs(E[a][2]); });
  }
  function chain(k, upstream) {
    // follow the strongest edge from the far end of edge k until a node with none (an embedding or a logit)
    var path = [k], seen = {};
    var node = upstream ? E[k][0] : E[k][1];
    while (!seen[node]) {
      seen[node] = true;
      var next = strongest(upstream ? inEdges[node] : outEdges[node]);
      if (!next.length) { break; }
      path.push(next[0]);
      node = upstream ? E[next[0]][0] : E[next[0]][1];
    }
    return path;
  }

  function select(i) {
    state.selected = i;
    var svg = document.getElementById('graph');
    var labels = document.getElementById('labels');
    while (labels && labels.firstChild) { labels.removeChild(labels.firstChild); }
    svg.querySelectorAll('.edge.hl').forEach(function (e) {
      e.classList.remove('hl', 'hl-in', 'hl-out', 'hl-path');
    });
    svg.querySelectorAll('.node.selected, .node.on-path').forEach(function (e) {
      e.classList.remove('selected', 'on-path');
    });
    var side = document.getElementById('side-body');
    while (side.firstChild) { side.removeChild(side.firstChild); }
    if (i < 0) {
      svg.classList.remove('has-selection');
      svg.removeAttribute('data-selected');
      var p = document.createElement('p');
      p.className = 'hint';
      p.textContent = 'Hover a node for its details; click it to highlight its strongest incoming and outgoing ' +
        'edges and the strongest paths through it (click again or on the background to clear).';
      side.appendChild(p);
      return;
    }
    svg.classList.add('has-selection');
    svg.setAttribute('data-selected', N[i].id);
    var inc = strongest(inEdges[i]), out = strongest(outEdges[i]);
    var marked = {};
    function mark(k, cls) {
      var e = svg.querySelector('.edge[data-k="' + k + '"]');
      if (!e) { return; }
      e.classList.add('hl', cls);
      marked[k] = true;
      [E[k][0], E[k][1]].forEach(function (v) {
        var nd = svg.querySelector('.node[data-i="' + v + '"]');
        if (nd && v !== i) { nd.classList.add('on-path'); }
      });
    }
    var paths = [];
    inc.slice(0, TOP_PATHS).forEach(function (k) { var c = chain(k, true); c.forEach(function (q) { mark(q, 'hl-path'); }); paths.push({ up: true, edges: c }); });
    out.slice(0, TOP_PATHS).forEach(function (k) { var c = chain(k, false); c.forEach(function (q) { mark(q, 'hl-path'); }); paths.push({ up: false, edges: c }); });
    inc.slice(0, TOP_DIRECT).forEach(function (k) { mark(k, 'hl-in'); });
    out.slice(0, TOP_DIRECT).forEach(function (k) { mark(k, 'hl-out'); });
    var sel = svg.querySelector('.node[data-i="' + i + '"]');
    if (sel) { sel.classList.add('selected'); }
    // weight labels on the highlighted edges, strongest first, each at the first point along its curve where it
    // overlaps no label placed before it (nor a logit's label)
    var placed = [];
    svg.querySelectorAll('.node.logit text').forEach(function (t) { placed.push(t.getBBox ? boxOf(t) : null); });
    placed = placed.filter(Boolean);
    Object.keys(marked).map(Number).sort(function (a, b) { return Math.abs(E[b][2]) - Math.abs(E[a][2]); })
      .forEach(function (k) {
        var e = E[k];
        var t = el('text', { 'class': 'wlabel', 'data-k': k }, labels);
        t.textContent = (e[2] >= 0 ? '+' : '') + fmt(e[2]);
        var spots = [0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78, 0.15, 0.85];
        for (var j = 0; j < spots.length; j++) {
          var pt = curvePoint(e[0], e[1], spots[j]);
          t.setAttribute('x', (pt[0] + 3).toFixed(1));
          t.setAttribute('y', (pt[1] + 3).toFixed(1));
          var b = boxOf(t);
          if (!placed.some(function (o) { return overlap(b, o); })) { break; }
          if (j === spots.length - 1) {
            pt = curvePoint(e[0], e[1], 0.5);
            t.setAttribute('x', (pt[0] + 3).toFixed(1));
            t.setAttribute('y', (pt[1] + 3).toFixed(1));
          }
        }
        placed.push(boxOf(t));
      });
    // side panel: the node, its strongest direct edges, the strongest paths
    var h = document.createElement('h2');
    h.textContent = nodeName(i);
    side.appendChild(h);
    row(side, 'id', N[i].id);
    if (N[i].act !== null) { row(side, 'activation', fmt(N[i].act)); }
    if (N[i].label) { row(side, 'label', N[i].label); }
    function table(title, list, far) {
      var h3 = document.createElement('h3');
      h3.textContent = title + ' (' + list.length + ')';
      side.appendChild(h3);
      var tb = document.createElement('table');
      list.slice(0, 12).forEach(function (k) {
        var tr = document.createElement('tr');
        var a = document.createElement('td');
        a.textContent = nodeName(E[k][far]);
        var w = document.createElement('td');
        w.className = 'w';
        w.textContent = (E[k][2] >= 0 ? '+' : '') + fmt(E[k][2]);
        tr.appendChild(a);
        tr.appendChild(w);
        tb.appendChild(tr);
      });
      side.appendChild(tb);
    }
    table('Strongest incoming edges', inc, 0);
    table('Strongest outgoing edges', out, 1);
    var h3 = document.createElement('h3');
    h3.textContent = 'Strongest paths (each step the largest |weight|)';
    side.appendChild(h3);
    paths.forEach(function (pth) {
      var steps = pth.up ? pth.edges.slice().reverse() : pth.edges;
      var text = nodeName(E[steps[0]][0]);
      steps.forEach(function (k) { text += ' →(' + (E[k][2] >= 0 ? '+' : '') + fmt(E[k][2]) + ') ' + nodeName(E[k][1]); });
      var d = document.createElement('div');
      d.className = 'path';
      d.textContent = text;
      side.appendChild(d);
    });
  }

  // ----------------------------------------------------------------------- controls
  function update() {
    var ns = document.getElementById('node-threshold'), es = document.getElementById('edge-threshold');
    state.nt = parseFloat(ns.value);
    state.et = parseFloat(es.value);
    document.getElementById('node-threshold-value').textContent = state.nt.toFixed(2);
    document.getElementById('edge-threshold-value').textContent = state.et.toFixed(3);
    var v = visibleSets(state.nt, state.et);
    state.visN = v.nodes;
    state.visE = v.edges;
    draw();
  }

  function setup() {
    var ns = document.getElementById('node-threshold'), es = document.getElementById('edge-threshold');
    ns.max = String(D.node_threshold);
    ns.value = String(D.node_threshold);
    es.max = String(D.edge_threshold);
    es.value = String(D.edge_threshold);
    if (!D.has_influence) { ns.disabled = true; ns.title = 'this file has no node influence'; }
    ns.addEventListener('input', update);
    es.addEventListener('input', update);
    document.getElementById('reset').addEventListener('click', function () {
      ns.value = String(D.node_threshold);
      es.value = String(D.edge_threshold);
      update();
    });
    document.getElementById('graph').addEventListener('click', function () { select(-1); });
    document.addEventListener('keydown', function (ev) { if (ev.key === 'Escape') { select(-1); } });
    update();
    document.body.setAttribute('data-viewer-ready', '1');
    flagErrors();
    if (window.location.hash === '#selftest') { selftest(); }
  }

  // ------------------------------------------------------------------------ selftest
  function selftest() {
    var res = { expected_nodes: N.length, expected_edges: E.length };
    var svg = document.getElementById('graph');
    res.drawn_nodes = svg.querySelectorAll('#nodes .node').length;
    res.drawn_edges = svg.querySelectorAll('#edges .edge').length;
    var ns = document.getElementById('node-threshold');
    ns.value = String(Math.min(0.5, D.node_threshold));
    ns.dispatchEvent(new Event('input'));
    res.nodes_at_half_threshold = svg.querySelectorAll('#nodes .node').length;
    ns.value = String(D.node_threshold);
    ns.dispatchEvent(new Event('input'));
    res.nodes_restored = svg.querySelectorAll('#nodes .node').length;
    // click the feature with the most edges (else the node with the most: a logit, an error)
    var best = -1, bestDeg = -1;
    N.forEach(function (n, i) {
      var deg = inEdges[i].length + outEdges[i].length + (n.type === 'feature' ? 1e6 : 0);
      if (n.type !== 'embedding' && deg > bestDeg) { best = i; bestDeg = deg; }
    });
    if (best >= 0) {
      var node = svg.querySelector('.node[data-i="' + best + '"]');
      node.dispatchEvent(new MouseEvent('mouseenter', { bubbles: false, clientX: 20, clientY: 20 }));
      res.tooltip_text = document.getElementById('tip').textContent;
      node.dispatchEvent(new MouseEvent('click', { bubbles: true }));
      res.clicked = N[best].id;
      res.clicked_index = best;
      var hl = svg.querySelectorAll('#edges .edge.hl');
      res.highlighted_edges = hl.length;
      res.highlighted_direct = 0;
      hl.forEach(function (e) {
        if (+e.getAttribute('data-s') === best || +e.getAttribute('data-t') === best) { res.highlighted_direct += 1; }
      });
      res.weight_labels = svg.querySelectorAll('#labels .wlabel').length;
    }
    res.errors = errors.slice();
    var ok = res.drawn_nodes === res.expected_nodes && res.drawn_edges === res.expected_edges &&
      res.nodes_restored === res.expected_nodes && res.nodes_at_half_threshold <= res.expected_nodes &&
      (best < 0 || (res.highlighted_direct > 0 && res.weight_labels === res.highlighted_edges)) &&
      errors.length === 0;
    document.getElementById('selftest').textContent = JSON.stringify(res);
    document.body.setAttribute('data-selftest', ok ? 'pass' : 'fail');
  }

  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', setup); } else { setup(); }
})();
