"""The status page served on ``GET /``: one self-contained HTML file (no
build step, nothing fetched from elsewhere) that lists the downloads with
progress, rates and peers, live from the WebSocket notifications and a
once-a-second ``system.multicall`` of ``tellActive`` / ``tellWaiting`` /
``tellStopped``, with pause/resume/remove buttons and a magnet field.

With ``--rpc-secret`` the page takes the secret from its URL fragment
(``http://127.0.0.1:6800/#secret=TOKEN``) or asks for it; it is kept in
the tab's sessionStorage only.
"""

from __future__ import annotations

__all__ = ["PAGE"]

_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>utpkit bt daemon</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .6em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3em .5em;border-bottom:1px solid #ddd;vertical-align:middle}
th{background:#f4f4f4}
.bar{width:10em;height:.9em;background:#eee;border-radius:3px;display:inline-block;vertical-align:middle}
.bar>div{height:100%;background:#3a7;border-radius:3px}
#state{color:#666;margin-left:1em}
#err,#msg{color:#b00}
form{margin:.8em 0}
input[type=text]{width:32em}
button{margin-right:.3em}
</style></head><body>
<h1>utpkit bt daemon <span id="state">connecting…</span></h1>
<div id="auth" hidden><label>RPC secret: <input id="secret" type="password"></label>
<button id="auth-ok">use</button></div>
<form id="add"><input id="magnet" type="text" placeholder="magnet:?xt=urn:btih:…">
<button type="submit">add magnet</button></form>
<div id="msg"></div><div id="err"></div>
<table><thead><tr><th>name</th><th>status</th><th>progress</th><th>down</th><th>up</th>
<th>peers</th><th></th></tr></thead><tbody id="rows"></tbody></table>
<script>
"use strict";
const KEYS=["gid","status","totalLength","completedLength","downloadSpeed","uploadSpeed",
            "connections","numSeeders","bittorrent","files","errorMessage","followedBy"];
let secret=null, ws=null, seq=0, busy=false;
const frag=new URLSearchParams(location.hash.slice(1));
if(frag.get("secret")) secret=frag.get("secret");
else if(sessionStorage.getItem("bt-secret")) secret=sessionStorage.getItem("bt-secret");
function params(p){return secret===null?p:["token:"+secret].concat(p);}
async function call(method,p){
  const r=await fetch("/jsonrpc",{method:"POST",headers:{"Content-Type":"application/json"},
    body:JSON.stringify({jsonrpc:"2.0",id:"p"+(++seq),method:method,params:params(p||[])})});
  const a=await r.json();
  if(a.error){ if(a.error.message==="Unauthorized") askSecret(); throw new Error(a.error.message); }
  return a.result;
}
function askSecret(){document.getElementById("auth").hidden=false;}
document.getElementById("auth-ok").onclick=()=>{
  secret=document.getElementById("secret").value; sessionStorage.setItem("bt-secret",secret);
  document.getElementById("auth").hidden=true; refresh();};
function human(n){n=Number(n);const u=["B","KiB","MiB","GiB","TiB"];let i=0;
  while(n>=1024&&i<u.length-1){n/=1024;i++;} return (i?n.toFixed(1):n)+" "+u[i];}
function nameOf(d){
  if(d.bittorrent&&d.bittorrent.info&&d.bittorrent.info.name) return d.bittorrent.info.name;
  if(d.files&&d.files.length) return d.files[0].path.split("/").pop();
  return d.gid;}
function cell(tr,cls,text){const td=document.createElement("td");td.className=cls;
  td.textContent=text;tr.appendChild(td);return td;}
function button(td,cls,label,method,gid){const b=document.createElement("button");
  b.className=cls;b.textContent=label;b.onclick=async()=>{
    try{await call(method,[gid]); showMsg(null);}catch(e){showMsg(e);} refresh();};
  td.appendChild(b);}
function showErr(e){document.getElementById("err").textContent=e?String(e.message||e):"";}
function showMsg(e){document.getElementById("msg").textContent=e?String(e.message||e):"";}
function render(list){
  const rows=document.getElementById("rows"); rows.textContent="";
  for(const d of list){
    const tr=document.createElement("tr"); tr.dataset.gid=d.gid; tr.dataset.status=d.status;
    const total=Number(d.totalLength), done=Number(d.completedLength);
    const pct=total?done*100/total:0;
    cell(tr,"name",nameOf(d)); cell(tr,"status",d.status+(d.errorMessage?": "+d.errorMessage:""));
    const p=cell(tr,"progress",""); const bar=document.createElement("span"); bar.className="bar";
    const fill=document.createElement("div"); fill.style.width=pct.toFixed(1)+"%";
    bar.appendChild(fill); p.appendChild(bar);
    const t=document.createElement("span"); t.className="pct"; t.dataset.completed=d.completedLength;
    t.textContent=" "+pct.toFixed(1)+"% of "+human(total); p.appendChild(t);
    cell(tr,"down",human(d.downloadSpeed)+"/s"); cell(tr,"up",human(d.uploadSpeed)+"/s");
    cell(tr,"peers",d.connections+" ("+(d.numSeeders||0)+" seeds)");
    const b=cell(tr,"actions","");
    if(d.status==="active"||d.status==="waiting") button(b,"pause","pause","aria2.pause",d.gid);
    if(d.status==="paused") button(b,"resume","resume","aria2.unpause",d.gid);
    if(["active","waiting","paused"].includes(d.status)) button(b,"remove","remove","aria2.remove",d.gid);
    else button(b,"remove","clear","aria2.removeDownloadResult",d.gid);
    rows.appendChild(tr);
  }
}
async function refresh(){
  if(busy) return; busy=true;
  try{
    const r=await call("system.multicall",[[
      {methodName:"aria2.tellActive",params:params([KEYS])},
      {methodName:"aria2.tellWaiting",params:params([0,1000,KEYS])},
      {methodName:"aria2.tellStopped",params:params([0,1000,KEYS])}]]);
    const list=[];
    for(const x of r){
      if(Array.isArray(x)) list.push(...x[0]);
      else { if(x.message==="Unauthorized") askSecret(); throw new Error(x.message); } }
    render(list); showErr(null);
  }catch(e){showErr(e);} finally{busy=false;}
}
function connect(){
  ws=new WebSocket((location.protocol==="https:"?"wss://":"ws://")+location.host+"/jsonrpc");
  ws.onopen=()=>{document.getElementById("state").textContent="live";};
  ws.onmessage=(m)=>{try{const n=JSON.parse(m.data); if(n.method) refresh();}catch(e){}};
  ws.onclose=()=>{document.getElementById("state").textContent="reconnecting…";
    setTimeout(connect,2000);};
}
document.getElementById("add").onsubmit=async(ev)=>{ev.preventDefault();
  const v=document.getElementById("magnet").value.trim(); if(!v) return;
  try{await call("aria2.addUri",[[v]]); document.getElementById("magnet").value=""; showMsg(null);}
  catch(e){showMsg(e);} refresh();};
connect(); refresh(); setInterval(refresh,1000);
</script></body></html>
"""

#: The page's bytes, as served.
PAGE = _HTML.encode("utf-8")
