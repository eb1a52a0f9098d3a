// bench/loopback.cjs: preloaded (node --require) into the Portkey gateway by
// bench/run.sh. The gateway's server listens on every interface when no host
// is given; this makes such a listen() bind 127.0.0.1 only.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
    if (typeof args[0] === 'number' && args[1] == null)
        args[1] = '127.0.0.1';
    return listen.apply(this, args);
};
