// Draws the dashboard's charts from the JSON the server embedded in the page (no requests of its own).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const palette = ["#2f6fdf", "#e0883a", "#2fa37a", "#c4485f", "#7d5bc9", "#8a8f2e", "#3aa3c4", "#9c6b4a"];
  const tierNames = data.tiers.map((tier) => tier.name);
  const colourOf = new Map(data.tiers.map((tier, index) => [tier.id, palette[index % palette.length]]));
  const segments = data.segments.items;
  const percent = (value) => Math.round(value * 1000) / 10;
  const money = (value) => (value === null || value === undefined ? null : Number(value));

  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.color = "#3b4250";
  Chart.defaults.maintainAspectRatio = false;
  // Charts are read, not watched; without animation a screenshot shows the final picture at once.
  Chart.defaults.animation = false;

  function draw(id, config) {
    const canvas = document.getElementById(id);
    return canvas ? new Chart(canvas, config) : null;
  }

  draw("chart-tier-sizes", {
    type: "bar",
    data: {
      labels: tierNames,
      datasets: [{
        label: "customers",
        data: segments.map((segment) => segment.customers),
        backgroundColor: segments.map((segment) => colourOf.get(segment.tier)),
      }],
    },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } },
  });

  draw("chart-revenue-share", {
    type: "bar",
    data: {
      labels: tierNames,
      datasets: [
        { label: "% of customers", data: segments.map((s) => percent(s.share)), backgroundColor: "#9db8e8" },
        { label: "% of revenue", data: segments.map((s) => percent(s.revenue_share)), backgroundColor: "#2f6fdf" },
      ],
    },
    options: { scales: { y: { beginAtZero: true, ticks: { callback: (value) => value + "%" } } } },
  });

  // Each score is two stacked floating bars, p10-p50 and p50-p90, so the colour change marks the median.
  const scoreKinds = [["value", "#2f6fdf", "#8fb0ee"], ["frequency", "#2fa37a", "#8fd1b9"], ["influence", "#e0883a", "#f0c39a"]];
  const scoreSets = [];
  for (const [kind, dark, light] of scoreKinds) {
    scoreSets.push({
      label: kind + " p10–p50",
      stack: kind,
      data: segments.map((s) => [s.scores[kind].p10, s.scores[kind].p50]),
      backgroundColor: light,
    });
    scoreSets.push({
      label: kind + " p50–p90",
      stack: kind,
      data: segments.map((s) => [s.scores[kind].p50, s.scores[kind].p90]),
      backgroundColor: dark,
    });
  }
  draw("chart-scores", {
    type: "bar",
    data: { labels: tierNames, datasets: scoreSets },
    options: {
      scales: { x: { stacked: true }, y: { stacked: false, beginAtZero: true } },
      plugins: { legend: { labels: { boxWidth: 12 } } },
    },
  });

  if (data.last_run) {
    const moves = data.last_run.moves;
    const sourceName = (source) => (source === "none" ? "New" : (data.tiers.find((t) => t.id === source) || { name: source }).name);
    draw("chart-moves", {
      type: "bar",
      data: {
        labels: data.move_sources.map(sourceName),
        datasets: data.tiers.map((tier) => ({
          label: "→ " + tier.name,
          data: data.move_sources.map((source) => (moves[source] || {})[tier.id] || 0),
          backgroundColor: colourOf.get(tier.id),
        })),
      },
      options: {
        indexAxis: "y",
        scales: { x: { stacked: true, title: { display: true, text: "customers" } }, y: { stacked: true } },
        plugins: { legend: { labels: { boxWidth: 12 } } },
      },
    });
  }

  if (data.campaigns.length) {
    const campaigns = data.campaigns.slice().reverse();
    draw("chart-campaigns", {
      type: "bar",
      data: {
        labels: campaigns.map((c) => c.name),
        datasets: [
          { label: "treatment / customer", data: campaigns.map((c) => money(c.revenue_per_customer.treatment)), backgroundColor: "#2f6fdf" },
          { label: "holdout / customer", data: campaigns.map((c) => money(c.revenue_per_customer.holdout)), backgroundColor: "#a3a9b5" },
          {
            label: "difference, 95% interval",
            data: campaigns.map((c) => (c.incremental_revenue.ci95 ? c.incremental_revenue.ci95.map(Number) : null)),
            backgroundColor: "#2fa37a",
          },
        ],
      },
      options: { scales: { y: { title: { display: true, text: "revenue per customer" } } } },
    });
  }
})();
