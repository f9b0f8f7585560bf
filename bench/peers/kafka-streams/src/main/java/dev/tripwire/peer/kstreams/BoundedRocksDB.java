package dev.tripwire.peer.kstreams;

import java.util.Map;
import org.apache.kafka.streams.state.RocksDBConfigSetter;
import org.rocksdb.BlockBasedTableConfig;
import org.rocksdb.Cache;
import org.rocksdb.LRUCache;
import org.rocksdb.Options;
import org.rocksdb.WriteBufferManager;

/**
 * The bounded-memory RocksDB setup of the Kafka Streams memory-management guide: one
 * block cache and one write-buffer manager shared by every store instance of the process
 * (the DSL app opens tasks × windows × segments instances), index and filter blocks in
 * the cache. Sizes are set by the runner ({@code --rocksdb-mb}) before the app starts.
 */
public final class BoundedRocksDB implements RocksDBConfigSetter {
    static volatile long totalBytes = 512L << 20;
    private static Cache cache;
    private static WriteBufferManager writeBuffers;

    private static synchronized void shared() {
        if (cache == null) {
            cache = new LRUCache(totalBytes, -1, false, 0.1);
            // Memtables count against the cache: half of it at most.
            writeBuffers = new WriteBufferManager(totalBytes / 2, cache);
        }
    }

    @Override
    public void setConfig(String storeName, Options options, Map<String, Object> configs) {
        shared();
        BlockBasedTableConfig table = (BlockBasedTableConfig) options.tableFormatConfig();
        table.setBlockCache(cache);
        table.setCacheIndexAndFilterBlocks(true);
        table.setCacheIndexAndFilterBlocksWithHighPriority(true);
        table.setPinTopLevelIndexAndFilter(true);
        options.setWriteBufferManager(writeBuffers);
        options.setTableFormatConfig(table);
    }

    @Override
    public void close(String storeName, Options options) {
        // The cache and the write-buffer manager are shared: never closed per store.
    }
}
